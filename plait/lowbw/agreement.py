"""The workers' agreement check (``lowbw.check_sync``): every worker hashes what must be the same
on all of them, the hashes are compared over the workers' group, and a difference stops the run.
Also where the small tensors of the workers' exchanges live (``exchange_device``)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from plait.telemetry import collectives as comm


class WorkerDivergence(RuntimeError):
    """The workers' weights differ after a sync: a bug or a corrupted exchange."""


def exchange_device(group) -> torch.device:
    """Where a tensor must be for a collective on ``group``: the GPU for an NCCL-only group (a
    CUDA job's default), else the CPU (gloo, or gloo beside NCCL)."""
    return device_for_backend(str(dist.get_backend(group)))


def device_for_backend(backend: str) -> torch.device:
    return torch.device("cpu" if "gloo" in backend or "nccl" not in backend else "cuda")


def check_same(digest: int, group, what: str) -> None:
    """Compare ``digest`` with the other ranks of ``group`` (None: nothing to compare); raise
    WorkerDivergence naming ``what`` when any differs. Bookkeeping, not counted traffic."""
    if group is None:
        return
    mine = torch.tensor([digest], dtype=torch.int64, device=exchange_device(group))
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    with comm.paused():
        dist.all_gather(everyone, mine, group=group)
    if len({int(d) for d in everyone}) > 1:
        raise WorkerDivergence(f"{what} (hashes {[int(d) for d in everyone]})")
