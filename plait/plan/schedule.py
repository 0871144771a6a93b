"""Pipeline schedules: the idle time they leave (bubble) and the micro-batches they keep alive.

``forward_s`` and ``backward_s`` are one micro-batch through all of a rank's layers (backward
includes recompute). The weight-gradient half of backward is what zero-bubble schedules move
into the bubble; with the input- and weight-gradient GEMMs the same size, it is backward / 2.
"""

from __future__ import annotations


def resolve_schedule(requested: str, pp: int, vpp: int) -> str:
    """The schedule a layout runs: ``auto`` is 1F1B, or interleaved 1F1B with several stages per rank."""
    if requested != "auto":
        return requested
    return "interleaved_1f1b" if vpp > 1 else "1f1b"


def bubble_seconds(schedule: str, pp: int, vpp: int, forward_s: float, backward_s: float) -> float:
    """Idle time per step on the critical path, seconds.

    - gpipe, 1f1b: (p-1)(F+B), the fill and drain of p stages;
    - interleaved_1f1b, looped_bfs: (p-1)(F+B)/v, each fill step is a v-th of the rank's layers;
    - interleaved_zero_bubble (ZB-H1 interleaved): (p-1)F/v, weight gradients fill the rest;
    - zbv: ZB-V on two V-placed chunks, (p-1)F/2;
    - dualpipev: DualPipe's (p/2-1)(F&B + B - 3W) with forward and backward of two micro-batches
      overlapped (F&B = F+B): (p/2-1)(F + 2B - 1.5B).
    """
    if pp == 1:
        return 0.0
    p, f, b = pp, forward_s, backward_s
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) * (f + b)
    if schedule in ("interleaved_1f1b", "looped_bfs"):
        return (p - 1) * (f + b) / vpp
    if schedule == "interleaved_zero_bubble":
        return (p - 1) * f / vpp
    if schedule == "zbv":
        return (p - 1) * f / 2
    if schedule == "dualpipev":
        return max(0.0, p / 2 - 1) * (f + 0.5 * b)
    raise ValueError(f"unknown pipeline schedule {schedule!r}")


def micro_batches_in_flight(schedule: str, pp: int, vpp: int, micro_batches: int) -> float:
    """Micro-batches whose activations the first stage holds at its peak, in units of one
    micro-batch through all of the rank's layers.

    - gpipe, looped_bfs: every micro-batch (all forwards before any backward);
    - 1f1b, zbv: p (zbv's V placement keeps 1F1B's peak);
    - interleaved_1f1b, interleaved_zero_bubble: p(1 + (p-1)/(p·v)) (Korthikanti et al.);
    - dualpipev: p + 1 (DualPipe's two directions each hold half of the chunks).
    """
    if pp == 1:
        return 1.0
    p, m = pp, micro_batches
    if schedule in ("gpipe", "looped_bfs"):
        held = m
    elif schedule in ("1f1b", "zbv"):
        held = p
    elif schedule in ("interleaved_1f1b", "interleaved_zero_bubble"):
        held = p + (p - 1) / vpp
    elif schedule == "dualpipev":
        held = p + 1
    else:
        raise ValueError(f"unknown pipeline schedule {schedule!r}")
    return float(min(held, m))
