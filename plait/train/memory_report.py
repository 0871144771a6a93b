"""The memory report of a run: what every rank holds of the model state, and its peak.

Printed twice by rank 0: right after the model is built (parameters, and the process's peak
so far, which is the initialization's), and after the first step (parameters, gradients,
optimizer state, peak). Each rank measures its own; one small all-gather brings the rows to
rank 0. Peak is CUDA's max allocated, or the process's peak resident set on CPU (the same
figure as ``mem_gib`` in metrics.jsonl).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from plait.parallel.zero import state_bytes
from plait.telemetry import collectives as comm
from plait.train.metrics import peak_memory_gib

FIELDS = ("params", "grads", "optimizer", "peak")
# Above this many ranks the report lists the smallest, the largest and rank 0 only.
LISTED_RANKS = 16


def measure(parts: list[nn.Module], optimizer: torch.optim.Optimizer | None, device: torch.device) -> dict[str, float]:
    """This rank's bytes of parameters, gradients and optimizer state, and its peak memory."""
    held = state_bytes(parts, optimizer)
    return {**{k: float(v) for k, v in held.items()}, "peak": peak_memory_gib(device) * 2**30}


def gather(row: dict[str, float], device: torch.device) -> list[dict[str, float]]:
    """Every rank's row, on every rank (one all-gather, not counted as training traffic)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [row]
    mine = torch.tensor([row[k] for k in FIELDS], dtype=torch.float64, device=device)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    with comm.paused():
        dist.all_gather(rows, mine)
    return [dict(zip(FIELDS, r.tolist())) for r in rows]


def report(rows: list[dict[str, float]], when: str, fields: tuple[str, ...] = FIELDS) -> str:
    """A few lines: one per rank (or the smallest, the largest and rank 0 of a big world)."""

    def line(rank: int, row: dict[str, float]) -> str:
        return f"  rank {rank}: " + ", ".join(f"{k} {row[k] / 2**30:.3f} GiB" for k in fields)

    ranked = list(enumerate(rows))
    if len(rows) > LISTED_RANKS:
        by_peak = sorted(ranked, key=lambda item: item[1]["peak"])
        ranked = sorted({0: rows[0], by_peak[0][0]: by_peak[0][1], by_peak[-1][0]: by_peak[-1][1]}.items())
    head = f"plait: memory {when} ({len(rows)} rank(s){', smallest and largest peak shown' if len(rows) > LISTED_RANKS else ''}):"
    return "\n".join([head, *(line(rank, row) for rank, row in ranked)])
