"""``lowbw.method = "zo"``: a training step without backward, and its one-byte exchange.

The workers are the ``dp_replicate`` groups, as for the DiLoCo family; inside one, each rank
holds its shards (FSDP, TP) and the loss is reduced over the worker's ranks as usual. Per step
and direction k (plait/lowbw/zeroth_order.py for the pieces):

1. perturb by +eps·z_k, evaluate the worker's mean token loss L+, perturb by -2eps·z_k,
   evaluate L-, perturb by +eps·z_k back: no gradient, no optimizer state;
2. g_k = (L+ − L-) / 2eps, the same on every rank of the worker; quantized to ``zo_bits``
   with stochastic rounding (the uniform draw seeded by the step, k and the worker) on the
   shared scale, and all-gathered between the workers' first ranks (the sync group of a
   worker's rank 0 holds exactly those; counted as ``dp_replicate``): one level per worker.
   A worker of several ranks broadcasts the gathered levels from its rank 0 over its own
   links. The first exchange of a run, before any scale exists, is float32;
3. every rank applies θ ← θ − lr · mean_k(ḡ_k) · z_k, regenerating z_k.

Every input of the update is identical on all workers, so their weights stay bitwise equal;
``lowbw.check_sync`` compares a hash of them after every step.
"""

from __future__ import annotations

import random
import warnings
import zlib

import torch
import torch.distributed as dist
from torch import nn

from plait.config import LowBWConfig
from plait.lowbw.agreement import WorkerDivergence, check_same, exchange_device  # noqa: F401 (WorkerDivergence: the API)
from plait.lowbw.zeroth_order import Piece, SharedScale, _hash64, dequantize, direction_seed, perturb_, quantize
from plait.telemetry import collectives as comm


def trained_pieces(parts: list[nn.Module], which: str) -> list[Piece]:
    """This rank's part of every trained tensor: ``all`` parameters, or ``norms_and_output``
    (the norm weights and the output layer). A DTensor contributes its local shard, at its
    global offset, so z is the same whatever the sharding."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    pieces = []
    for part in parts:
        for name, param in part.named_parameters():
            if which == "norms_and_output" and not ("norm" in name or name.startswith("output")):
                continue
            if isinstance(param, DTensor):
                _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
                pieces.append(Piece(name, param.to_local().data, tuple(offset)))
            else:
                pieces.append(Piece(name, param.data, (0,) * param.dim()))
    return pieces


def step_schedule(scheduler) -> None:
    """Advance the learning-rate schedule. No optimizer steps under zo, which torch's scheduler
    takes for a misuse and warns about on every step; here it is the design."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        scheduler.step()


def mean_over_workers(loss: float, tokens: float, group) -> float:
    """The token-weighted mean of the workers' losses (each the same on all its ranks), for the
    metrics: bookkeeping, not counted as training traffic."""
    if group is None:
        return loss
    total = torch.tensor([loss * tokens, tokens], dtype=torch.float64, device=exchange_device(group))
    with comm.paused():
        dist.all_reduce(total, group=group)
    return float(total[0] / total[1].clamp_min(1.0))


class ZerothOrder:
    def __init__(self, cfg: LowBWConfig, parts: list[nn.Module], sync_group, worker_group, worker: int,
                 seed: int, check_group=None):
        self.cfg, self.parts = cfg, parts
        self.sync_group, self.worker_group, self.check_group = sync_group, worker_group, check_group
        self.worker, self.seed = worker, seed
        self.pieces = trained_pieces(parts, cfg.zo_params)
        self.scale = SharedScale(cfg.zo_bits)
        self.step_syncs: list[dict] = []
        self.metrics_group = check_group  # the same ranks: this rank's peers in the other workers
        self._worker_size = dist.get_world_size(worker_group) if worker_group is not None else 1
        self._leader = self._worker_size == 1 or dist.get_rank(worker_group) == 0  # sends for its worker
        self._workers = dist.get_world_size(sync_group) if sync_group is not None else 1
        self._device = exchange_device(sync_group) if sync_group is not None else torch.device("cpu")

    # --- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, step: int, worker_loss, lr: float) -> tuple[float, float]:
        """One zeroth-order step; ``worker_loss()`` evaluates the worker's mean token loss at the
        current weights. Returns (the mean of the evaluated losses, |mean directional derivative|)."""
        eps, samples = self.cfg.zo_eps, self.cfg.zo_samples
        losses, averages = [], []
        self.step_syncs = []
        for k in range(samples):
            seed = direction_seed(self.seed, step, k)
            perturb_(self.pieces, seed, eps)
            plus = worker_loss()
            perturb_(self.pieces, seed, -2 * eps)
            minus = worker_loss()
            perturb_(self.pieces, seed, eps)
            losses += [plus, minus]
            averages.append(self.exchange((plus - minus) / (2 * eps), step, k))
        for k, g in enumerate(averages):
            perturb_(self.pieces, direction_seed(self.seed, step, k), -lr * g / samples)
        self.scale.observe(averages)
        if self.cfg.check_sync:
            self.check(step)
        return sum(losses) / len(losses), abs(sum(averages) / samples)

    def exchange(self, g: float, step: int, k: int) -> float:
        """The average of ``g`` over the workers, the same bits on every rank. One rank per
        worker (its first) sends; a worker of several ranks then shares the workers' levels
        over its own fast links, so a worker sends one level whatever its size."""
        n, device = self._workers, self._device
        if n == 1:  # one worker: nothing to send
            return g
        dtype = torch.float32 if not self.scale.ready else torch.int8 if self.cfg.zo_bits <= 8 else torch.int16
        everyone = [torch.zeros(1, dtype=dtype, device=device) for _ in range(n)]
        if self._leader:
            if self.scale.ready:
                uniform = random.Random(_hash64("zo-round", self.seed, step, k, self.worker)).random()
                level = quantize(g, self.scale.scale, self.cfg.zo_bits, uniform)
                mine = torch.tensor([level], dtype=dtype, device=device)
            else:  # the run's first exchange: no agreed scale yet
                mine = torch.tensor([g], dtype=dtype, device=device)
            dist.all_gather(everyone, mine, group=self.sync_group)
            self.step_syncs.append({"bytes": mine.element_size(), "wait_s": 0.0})
        if self._worker_size > 1:
            gathered = torch.cat(everyone)
            dist.broadcast(gathered, group=self.worker_group, group_src=0)
            everyone = list(gathered)
        if dtype == torch.float32:
            return float(sum(float(v) for v in everyone)) / n
        return dequantize(sum(int(v) for v in everyone), self.scale.scale) / n

    def check(self, step: int) -> None:
        """Compare a hash of this rank's trained tensors with its peers in the other workers."""
        digest = 0
        for piece in self.pieces:
            digest = zlib.crc32(piece.data.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(), digest)
        check_same(digest, self.check_group, f"step {step}: the workers' weights differ after the zeroth-order step")

    # --- the outer-loop interface the trainer uses -----------------------------------------
    zeroth_order = True  # the trainer runs ``step`` in place of forward, backward and AdamW

    def after_step(self, step: int) -> None:
        pass  # the exchange happened inside ``step``

    def finish(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"zo_scale": self.scale.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scale.load_state_dict(state["zo_scale"])
