"""The outer loop of DiLoCo, Streaming DiLoCo and CO2 around the trainer's inner AdamW steps.

Workers are the ``dp_replicate`` groups: inside one, gradients are reduced every step as usual
(FSDP, TP, PP and CP all work); across them only the outer gradients travel, every H steps.
Each rank syncs its own local pieces with the ranks holding the same pieces in the other
workers (its ``dp_replicate`` group).

- **diloco**: every H steps, outer gradient g = global − local, averaged over the workers,
  outer Nesterov SGD on the global weights (a float32 copy in CPU memory), the new global
  weights replace the local ones. The inner optimizer state is kept across rounds.
- **streaming**: the model is cut into P fragments (plait/lowbw/fragments.py); fragment f is
  synced every H steps, the fragments H/P steps apart. Its exchange starts tau steps before it
  is applied, and training goes on meanwhile; the arriving global fragment is mixed with the
  local one: local <- alpha·local + (1 − alpha)·global.
- **co2**: every H steps each worker sends its progress of the round (anchor − local) and goes
  on at once; the average arrives during the next round and is applied one round late, with the
  staleness gap penalty and outer momentum clipping (plait/lowbw/outer.py). The local weights
  become the new global weights plus the worker's own progress of the round just ended.

Exchanges run on a background thread over a process group of their own, so overlapped syncs
do not block training. Outer gradients may be quantized (plait/lowbw/quantize.py; with error
feedback); the average is bit-identical on every worker, and with ``check_sync`` a hash of the
global weights is compared across workers after each sync, so workers never diverge silently.
"""

from __future__ import annotations

import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from plait.config import LowBWConfig
from plait.lowbw.agreement import WorkerDivergence, check_same, exchange_device  # noqa: F401 (WorkerDivergence: the API)
from plait.lowbw.fragments import Fragment, split_fragments
from plait.lowbw.outer import outer_step, staleness_scales
from plait.lowbw.quantize import scale_groups
from plait.lowbw.reduce import quantized_mean
from plait.lowbw.zo_step import ZerothOrder
from plait.telemetry import collectives as comm


@dataclass
class Exchange:
    """One outer gradient in flight: launched at ``start``, applied at ``apply``."""

    fragment: int
    start: int
    apply: int
    future: Future
    progress: torch.Tensor | None = None  # co2: the worker's own progress since the launch
    reference: torch.Tensor | None = None  # co2: the global weights when its round began


class OuterLoop:
    zeroth_order = False  # inner AdamW steps, synced by the outer loop (zo_step.ZerothOrder: True)

    def __init__(self, cfg: LowBWConfig, parts: list[nn.Module], sync_group, worker_group, device: torch.device,
                 injector=None, check_group=None):
        self.cfg, self.parts, self.device = cfg, parts, device
        self.sync_group, self.worker_group = sync_group, worker_group
        # The hash check runs on the main thread while the next exchange may be in flight on
        # sync_group, so it needs a group of its own (same ranks).
        self.check_group = check_group if check_group is not None else sync_group
        self.injector = injector
        self.count = cfg.fragments if cfg.method == "streaming" else 1
        self.H = cfg.inner_steps
        self.tau = cfg.overlap_steps if cfg.method == "streaming" else 0
        self.mix = cfg.mix if cfg.method == "streaming" else 0.0
        fragments = self.fragments()
        self.global_w = [f.read() for f in fragments]  # the outer weights: float32, in CPU memory
        self.momentum = [torch.zeros_like(g) for g in self.global_w]
        self.residual = [torch.zeros_like(g, device=device) for g in self.global_w] if cfg.error_feedback else None
        self.anchor = [g.clone() for g in self.global_w] if cfg.method == "co2" else None
        self.groups = [scale_groups(f.shapes, cfg.quant_scale, cfg.quant_block) for f in fragments]
        self.pending: list[Exchange] = []
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plait-outer")
        self.syncs: list[dict] = []  # one entry per applied sync: step, fragment, bytes, wait_s
        self.step_syncs: list[dict] = []  # those of the current step (the trainer logs them)

    # ---- schedule ---------------------------------------------------------------------------

    def fragments(self) -> list[Fragment]:
        # Rebuilt on use: FSDP2 swaps sharded and unsharded parameters around forward/backward.
        return split_fragments(self.parts, self.count)

    def launches_at(self, step: int) -> list[int]:
        """Fragments whose exchange starts after ``step``."""
        if self.cfg.method == "co2":
            return [0] if step % self.H == 0 else []
        gap = self.H // self.count
        applied = step + self.tau
        if applied % gap:
            return []
        fragment = (applied // gap - 1) % self.count
        return [fragment] if applied >= gap else []

    # ---- the step hook ----------------------------------------------------------------------

    def after_step(self, step: int) -> None:
        """Called after every inner optimizer step (all ranks of all workers)."""
        self.step_syncs = []
        if self.cfg.method == "co2":
            if step % self.H == 0:
                self._co2_round(step)
            return
        for fragment in self.launches_at(step):
            self._launch(fragment, step, step + self.tau)
        for exchange in [e for e in self.pending if e.apply == step]:
            self._apply(exchange, step)

    def finish(self, step: int) -> None:
        """Apply every exchange still in flight (co2's last round) so training ends synced."""
        while self.pending:
            exchange = self.pending[0]
            exchange.progress = None  # nothing trained after it: land exactly on the global weights
            self._apply(exchange, step)

    # ---- exchanges --------------------------------------------------------------------------

    def _outer_gradient(self, fragment: int, reference: torch.Tensor) -> torch.Tensor:
        return (reference - self.fragments()[fragment].read()).to(self.device)

    def _launch(self, fragment: int, step: int, apply: int, grad: torch.Tensor | None = None) -> Exchange:
        if grad is None:
            grad = self._outer_gradient(fragment, self.global_w[fragment])
        residual = self.residual[fragment] if self.residual is not None else None
        groups, kind = self.groups[fragment], self.cfg.quantize
        future = self.pool.submit(self._exchange, grad, groups, kind, residual)
        exchange = Exchange(fragment, step, apply, future)
        self.pending.append(exchange)
        if self.injector is not None:
            self.injector.in_sync(step)
        return exchange

    def _exchange(self, grad: torch.Tensor, groups: torch.Tensor, kind: str, residual) -> tuple[torch.Tensor, int]:
        """On the background thread: the workers' mean outer gradient and the bytes it took."""
        before = comm.total_wire_bytes("dp_replicate")
        if grad.numel() == 0:
            return grad.cpu(), 0
        mean = quantized_mean(grad, groups, kind, self.sync_group, residual)
        return mean.cpu(), comm.total_wire_bytes("dp_replicate") - before

    def _wait(self, exchange: Exchange, step: int) -> torch.Tensor:
        begin = time.perf_counter()
        mean, nbytes = exchange.future.result()
        self.pending.remove(exchange)
        entry = {"step": step, "fragment": exchange.fragment, "launched": exchange.start, "bytes": nbytes,
                 "wait_s": time.perf_counter() - begin}
        self.syncs.append(entry)
        self.step_syncs.append(entry)
        return mean

    def _sq_sum(self, local: float) -> float:
        """A squared norm summed over this worker's ranks (its shards and stages)."""
        if self.worker_group is None:
            return local
        value = torch.tensor([local], dtype=torch.float64, device=exchange_device(self.worker_group))
        with comm.paused():
            dist.all_reduce(value, group=self.worker_group)
        return float(value)

    def _apply(self, exchange: Exchange, step: int) -> None:
        f = exchange.fragment
        mean = self._wait(exchange, step)
        cfg = self.cfg
        fragment = self.fragments()[f]
        if cfg.method == "co2" and cfg.co2_penalty > 0:
            sizes = [s.numel() for s in fragment.shapes]
            gap = self.global_w[f] - exchange.reference
            mean = mean * staleness_scales(mean, gap, sizes, cfg.co2_penalty)
        clip = cfg.co2_clip if cfg.method == "co2" else 0.0
        outer_step(self.global_w[f], self.momentum[f], mean, cfg.outer_lr, cfg.outer_momentum, cfg.nesterov,
                   clip, self._sq_sum)
        if cfg.check_sync:
            self._check(f, step)
        new = self.global_w[f]
        if cfg.method == "co2":
            if exchange.progress is not None:  # the worker's own progress (anchor − local) on top
                new = new - exchange.progress
            self.anchor[f] = new.clone()
        elif self.mix > 0:
            new = self.mix * fragment.read() + (1 - self.mix) * new
        fragment.write(new)

    def _co2_round(self, step: int) -> None:
        """End of a co2 round: send this round's progress, then apply last round's average."""
        due = [e for e in self.pending if e.apply == step]
        local = self.fragments()[0].read()
        progress = self.anchor[0] - local
        exchange = self._launch(0, step, step + self.H, progress.to(self.device))
        exchange.reference = self.global_w[0].clone()  # the next outer step moves it: the gap
        for previous in due:
            previous.progress = progress
            self._apply(previous, step)
        if not due:
            self.anchor[0] = local.clone()

    def _check(self, fragment: int, step: int) -> None:
        check_same(zlib.crc32(self.global_w[fragment].numpy().tobytes()), self.check_group,
                   f"step {step}: the workers' global weights of fragment {fragment} differ after the outer sync")

    # ---- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything the outer loop needs to resume exactly; in-flight exchanges are waited
        for here and kept with the step they are due at."""
        pending = []
        for exchange in self.pending:
            mean, nbytes = exchange.future.result()
            pending.append({"fragment": exchange.fragment, "start": exchange.start, "apply": exchange.apply,
                            "mean": mean, "bytes": nbytes, "progress": exchange.progress,
                            "reference": exchange.reference})
        state = {"global": self.global_w, "momentum": self.momentum, "pending": pending}
        if self.residual is not None:
            state["residual"] = [r.cpu() for r in self.residual]
        if self.anchor is not None:
            state["anchor"] = self.anchor
        return state

    def load_state_dict(self, state: dict) -> None:
        self.global_w, self.momentum = state["global"], state["momentum"]
        if self.residual is not None:
            self.residual = [r.to(self.device) for r in state["residual"]]
        if self.anchor is not None:
            self.anchor = state["anchor"]
        self.pending = []
        for item in state["pending"]:
            future: Future = Future()
            future.set_result((item["mean"], item["bytes"]))
            self.pending.append(Exchange(item["fragment"], item["start"], item["apply"], future, item["progress"],
                                         item["reference"]))

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def build_outer_loop(cfg: LowBWConfig, parts: list[nn.Module], dims, device: torch.device, injector=None,
                     seed: int = 0):
    """The outer loop for ``lowbw.method``, or None for plain training. Collective."""
    if cfg.method == "none":
        return None
    sync, worker = dims.worker_groups()
    check = None
    if sync is not None:
        comm.register_group(sync, "dp_replicate")  # counted (and emulated) as the workers' link
        check = dims.group("dp_replicate")
    if cfg.method == "zo":
        return ZerothOrder(cfg, parts, sync, worker, dims.local_rank("dp_replicate"), seed, check)
    return OuterLoop(cfg, parts, sync, worker, device, injector, check)
