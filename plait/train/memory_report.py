"""The memory report of a run: what every rank holds of the model state, and its peak.

Printed twice by rank 0: right after the model is built (parameters, and the process's peak
so far, which is the initialization's), and after the first step (parameters, gradients,
optimizer state, peak, and what of it lives in host memory). Each rank measures its own; one
small all-gather brings the rows to rank 0. Peak is CUDA's max allocated, or the process's peak
resident set on CPU (the same figure as ``mem_gib`` in metrics.jsonl).

After the first step each run also draws ``memory.png`` (:func:`plot_breakdown`): per rank, on
the device and in host memory, parameters, gradients, optimizer state, activations (the peak
of what autograd kept for backward, from the saved-activation meter; offloaded ones at their
most in host memory) and the rest of the peak. Where each piece of model state lives follows
``memory.offload``: ``optimizer`` puts the optimizer state in host memory, ``params`` the
parameters, gradients and optimizer state.
"""

from __future__ import annotations

import os
import textwrap

import torch
import torch.distributed as dist
from torch import nn

from plait.parallel.zero import state_bytes
from plait.telemetry import collectives as comm
from plait.train.metrics import peak_memory_gib

FIELDS = ("params", "grads", "optimizer", "peak")
STATE = ("params", "grads", "optimizer")
# A row: the totals above, then what of them is in host memory, then activations.
ROW = (*FIELDS, "host_params", "host_grads", "host_optimizer", "device_activations", "host_activations")
def resident_bytes() -> int:
    """This process's resident set now (Linux), 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


# What the process held when plait's modules were imported: the runtime, not the run.
RUNTIME_BYTES = resident_bytes()
# Above this many ranks the report lists the smallest, the largest and rank 0 only.
LISTED_RANKS = 16


def in_host_memory(offload: str) -> set[str]:
    """Which model state ``memory.offload`` keeps in host memory."""
    return {"none": set(), "optimizer": {"optimizer"}, "params": set(STATE)}[offload]


def located_state(parts: list[nn.Module], optimizer: torch.optim.Optimizer | None,
                  offload: str) -> dict[str, dict[str, int]]:
    """This rank's model state bytes by place: {"device": {...}, "host": {...}}."""
    held, host = state_bytes(parts, optimizer), in_host_memory(offload)
    return {where: {k: v if (k in host) == (where == "host") else 0 for k, v in held.items()}
            for where in ("device", "host")}


def offload_ledgers(parts: list[nn.Module]) -> list:
    """The activation-offload ledgers of this rank's model parts (plait/parallel/activation_offload.py)."""
    return [part.activation_offload.ledger for part in parts if getattr(part, "activation_offload", None)]


def measure(parts: list[nn.Module], optimizer: torch.optim.Optimizer | None, device: torch.device,
            offload: str = "none", saved_activations: int = 0) -> dict[str, float]:
    """This rank's row: bytes of parameters, gradients and optimizer state (and what of them
    is in host memory), its peak memory, and the activations kept for backward on the device
    (``saved_activations``, measured by the caller) and at most in host memory."""
    located = located_state(parts, optimizer, offload)
    row = {k: float(located["device"][k] + located["host"][k]) for k in STATE}
    row.update({f"host_{k}": float(located["host"][k]) for k in STATE})
    row["peak"] = peak_memory_gib(device) * 2**30
    # On CPU the peak is the process's resident set; what the Python and torch runtime held
    # before the model existed is not the run's.
    row["runtime"] = float(RUNTIME_BYTES if device.type == "cpu" else 0)
    row["device_activations"] = float(saved_activations)
    row["host_activations"] = float(sum(ledger.host_peak for ledger in offload_ledgers(parts)))
    return row


def gather(row: dict[str, float], device: torch.device) -> list[dict[str, float]]:
    """Every rank's row, on every rank (one all-gather, not counted as training traffic)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [row]
    keys = sorted(row)
    mine = torch.tensor([row[k] for k in keys], dtype=torch.float64, device=device)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    with comm.paused():
        dist.all_gather(rows, mine)
    return [dict(zip(keys, r.tolist())) for r in rows]


def report(rows: list[dict[str, float]], when: str, fields: tuple[str, ...] = FIELDS) -> str:
    """A few lines: one per rank (or the smallest, the largest and rank 0 of a big world)."""

    def line(rank: int, row: dict[str, float]) -> str:
        host = sum(row.get(f"host_{k}", 0.0) for k in STATE)
        where = f" ({host / 2**30:.3f} GiB of the model state in host memory)" if host else ""
        kept, moved = row.get("device_activations", 0.0), row.get("host_activations", 0.0)
        if kept or moved:
            where += f"; activations kept for backward {kept / 2**30:.3f} GiB on the device"
            where += f", {moved / 2**30:.3f} GiB offloaded" if moved else ""
        return f"  rank {rank}: " + ", ".join(f"{k} {row[k] / 2**30:.3f} GiB" for k in fields) + where

    ranked = list(enumerate(rows))
    if len(rows) > LISTED_RANKS:
        by_peak = sorted(ranked, key=lambda item: item[1]["peak"])
        ranked = sorted({0: rows[0], by_peak[0][0]: by_peak[0][1], by_peak[-1][0]: by_peak[-1][1]}.items())
    head = f"plait: memory {when} ({len(rows)} rank(s){', smallest and largest peak shown' if len(rows) > LISTED_RANKS else ''}):"
    return "\n".join([head, *(line(rank, row) for rank, row in ranked)])


def breakdown(row: dict[str, float], device: torch.device) -> dict[str, dict[str, float]]:
    """A row as bytes by place and kind: {"device": {params, grads, optimizer, activations,
    rest}, "host": {params, grads, optimizer, activations}}. The rest is the peak less what
    is accounted for (on CPU, where the peak is the whole process's, less the host part and the
    runtime too)."""
    device_part = {k: row[k] - row[f"host_{k}"] for k in STATE}
    device_part["activations"] = row["device_activations"]
    host_part = {k: row[f"host_{k}"] for k in STATE}
    host_part["activations"] = row["host_activations"]
    accounted = sum(device_part.values()) + (sum(host_part.values()) if device.type == "cpu" else 0.0)
    device_part["rest"] = max(0.0, row["peak"] - row.get("runtime", 0.0) - accounted)
    return {"device": device_part, "host": host_part}


def plot_breakdown(rows: list[dict[str, float]], device: torch.device, path: str, title: str) -> bool:
    """memory.png: per rank, stacked bars of the device's and the host's part (GiB). False
    when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    kinds = ("params", "grads", "optimizer", "activations", "rest")
    colours = dict(zip(kinds, ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#a0a0a0")))
    parts = [breakdown(row, device) for row in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(rows) + 2), 4))
    width = 0.38
    for where, shift, hatch in (("device", -width / 2, ""), ("host", width / 2, "//")):
        bottoms = [0.0] * len(rows)
        for kind in kinds:
            heights = [p[where].get(kind, 0.0) / 2**30 for p in parts]
            label = kind if where == "device" else None
            ax.bar([i + shift for i in range(len(rows))], heights, width, bottom=bottoms, color=colours[kind],
                   hatch=hatch, edgecolor="white", label=label)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_xticks(range(len(rows)), [f"rank {i}\ndevice | host" for i in range(len(rows))])
    ax.set_ylabel("GiB")
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
