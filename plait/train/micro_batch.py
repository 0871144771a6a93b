"""``train.micro_batch = auto``: try growing micro-batches on the real device and layout before
training, and keep the largest that fits (the idea of NeMo's OOMptimizer).

A try is one forward, backward and optimizer step of one micro-batch of real training windows,
with every learning rate at 0 (AdamW then leaves the weights bitwise as they were, weight decay
included, and still allocates its moments, so the peak is the real one). Afterwards the
optimizer state and the gradients are dropped and the learning rates restored: training starts
exactly as it would have without the tries. The candidates are the divisors of the per-rank
batch (the micro-batch must divide it); the search doubles through them until a try does not
fit, then bisects between the last fit and the first miss. Every rank runs the same tries and
they agree on each verdict (one all-reduce), so collectives stay in step.

A try fits when its peak is at most ``(1 - memory.headroom) x`` the budget. On CUDA the peak is
the allocator's maximum and the budget ``memory.budget_gib`` or the GPU's memory; a try that
runs out of memory is a miss, never the end of the run. On CPU, where allocation does not fail
cleanly, the peak is the most tensor storage held at once on the device side
(plait/telemetry/device_memory.py): what offloading keeps in host memory does not count.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from plait.data.loader import collate
from plait.errors import ConfigError
from plait.parallel.data_parallel import set_gradient_sync
from plait.telemetry import collectives as comm
from plait.telemetry.device_memory import DeviceMemory, host_memory
from plait.train import memory_report as memory
from plait.train.optim import clip_grad_norm

GIB = 2**30


@dataclass(frozen=True)
class Try:
    micro_batch: int
    peak_bytes: float  # inf when the try failed
    fits: bool


def candidates(per_rank_batch: int) -> list[int]:
    """Micro-batches that divide the per-rank batch, smallest first."""
    return [m for m in range(1, per_rank_batch + 1) if per_rank_batch % m == 0]


def search(options: Sequence[int], attempt: Callable[[int], Try]) -> tuple[int | None, list[Try]]:
    """The largest of ``options`` (ascending) whose ``attempt`` fits, assuming that fitting is
    monotone in the micro-batch: doubling first, then bisection. None if even the first misses."""
    tries: list[Try] = []

    def fits(index: int) -> bool:
        result = attempt(options[index])
        tries.append(result)
        return result.fits

    good, bad, index = -1, len(options), 0
    while index < len(options):
        if not fits(index):
            bad = index
            break
        good, index = index, 2 * index + 1  # about doubling through the options
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return (options[good] if good >= 0 else None), tries


def device_budget(device: torch.device, budget_gib: float) -> float:
    """Bytes a try may use before the headroom: the configured budget, or the GPU's memory."""
    if budget_gib > 0:
        return budget_gib * GIB
    return float(torch.cuda.get_device_properties(device).total_memory)


def agree(value: float, fits: bool, device: torch.device) -> tuple[float, bool]:
    """Every rank's worst peak, and whether the try fitted on all of them (one all-reduce)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value, fits
    both = torch.tensor([value if math.isfinite(value) else 1e300, 0.0 if fits else 1.0],
                        dtype=torch.float64, device=device)
    with comm.paused():
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
    peak = float(both[0])
    return (math.inf if peak >= 1e300 else peak), bool(both[1] == 0)


def describe(tries: list[Try], chosen: int | None, limit: float) -> str:
    """One line for the log: every try and the choice."""
    shown = ", ".join(
        f"{t.micro_batch} {'fits' if t.fits else 'misses'}"
        + (f" ({t.peak_bytes / GIB:.3f} GiB)" if math.isfinite(t.peak_bytes) else " (out of memory)")
        for t in tries
    )
    choice = f"train.micro_batch = {chosen}" if chosen else "none fits"
    return f"plait: micro-batch by trial under {limit / GIB:.3f} GiB: {shown} -> {choice}"


def pick_micro_batch(trainer) -> int:
    """Run the tries for ``trainer`` (built up to its optimizer) and return the micro-batch to
    train with; prints the tries on rank 0. Raises ConfigError when not even 1 fits."""
    cfg, device = trainer.cfg, trainer.device
    options = [m for m in candidates(cfg.train.global_batch // trainer.dims.dp)
               if len(trainer.data.val) == 0 or len(trainer.data.val) >= m * trainer.dims.dp]  # validation too
    limit = (1 - cfg.memory.headroom) * device_budget(device, cfg.memory.budget_gib)
    windows = trainer.data.train

    def attempt(micro_batch: int) -> Try:
        batch = collate([windows[i % len(windows)] for i in range(micro_batch)])
        peak, failed = _measured(trainer, batch)
        peak, fits = agree(peak, not failed and peak <= limit, device)
        return Try(micro_batch, peak, fits)

    groups = trainer.optimizer.param_groups
    lrs = [group["lr"] for group in groups]
    for group in groups:
        group["lr"] = 0.0  # AdamW leaves the weights bitwise unchanged and still allocates its state
    try:
        with comm.paused():
            chosen, tries = search(options, attempt)
    finally:
        for group, lr in zip(groups, lrs):
            group["lr"] = lr
        _forget(trainer.optimizer)
    if trainer.rank == 0:
        print(describe(tries, chosen, limit), flush=True)
    if chosen is None:
        where = f"memory.budget_gib = {cfg.memory.budget_gib}" if cfg.memory.budget_gib else "the GPU's memory"
        raise ConfigError(f"train.micro_batch = 'auto': not even a micro-batch of 1 fits {where} with "
                          f"memory.headroom = {cfg.memory.headroom}; offload (memory.*) or shard more")
    return chosen


def _measured(trainer, batch) -> tuple[float, bool]:
    """(device-side peak bytes of one step on ``batch``, whether it ran out of memory)."""
    device = trainer.device
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            _step(trainer, batch)
            return float(torch.cuda.max_memory_allocated(device)), False
        tracker = DeviceMemory()
        params = [p for part in trainer.parts for p in part.parameters()]
        tracker.add(*params, host="params" in memory.in_host_memory(trainer.cfg.memory.offload))
        with tracker:
            _step(trainer, batch, tracker)
        return float(tracker.peak), False
    except torch.OutOfMemoryError:
        return math.inf, True
    finally:
        _forget(trainer.optimizer)
        for part in trainer.parts:
            part.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _step(trainer, batch, tracker: DeviceMemory | None = None) -> None:
    """One training step of one micro-batch (lr 0): forward, backward with the gradient
    reduction, clipping, the optimizer step. ``tracker`` (CPU) learns what offloading puts in
    host memory: the gradients once reduced (``params``: FSDP2 copies each unit's to the host
    right after its reduce-scatter; counted here from the end of backward, a bound) and the
    optimizer's state and arithmetic."""
    for part in trainer.parts:
        part.train()
    set_gradient_sync(trainer.model, True)
    with trainer._loss_context():
        trainer._loss_sum(trainer._local(batch)).backward()
    params = [p for part in trainer.parts for p in part.parameters()]
    offload = trainer.cfg.memory.offload
    if tracker is not None and "grads" in memory.in_host_memory(offload):
        tracker.mark_host(*(p.grad for p in params))
    clip_grad_norm(params, trainer.cfg.train.grad_clip, trainer.dims.group("pp"))
    with host_memory() if offload != "none" else contextlib.nullcontext():
        trainer.optimizer.step()


def _forget(optimizer: torch.optim.Optimizer) -> None:
    """Drop the optimizer state a try created (ZeRO-1 keeps it in its local optimizer)."""
    inner = getattr(optimizer, "optim", optimizer)
    inner.state.clear()
    optimizer.zero_grad(set_to_none=True)
