"""Running this rank's pipeline stages: a training step through the torch schedule, and a
plain forward chain for validation (no schedule needed, no backward)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from plait.config import JobConfig
from plait.parallel.dims import ParallelDims
from plait.telemetry import collectives as comm
from plait.parallel.pipeline import build_schedule, stage_owner
from plait.telemetry.timeline import PipelineTimeline, step_bubble
from plait.train.loss import plain


class PipelineRunner:
    def __init__(self, parts: list[nn.Module], ids: list[int], cfg: JobConfig, dims: ParallelDims,
                 device: torch.device, loss_sum, n_microbatches: int):
        self.parts, self.ids, self.cfg, self.device = parts, ids, cfg, device
        self.loss_sum = loss_sum
        self.n_stages = cfg.parallel.pp * cfg.parallel.pp_virtual_stages
        self.group = dims.group("pp")
        self.pp_rank = dims.local_rank("pp")
        self.scale = 1.0
        self.schedule, self.stages = build_schedule(
            parts, ids, cfg, n_microbatches, self._scaled_loss, self.group, device
        )
        # Always on: two clock reads per stage compute call, against milliseconds of compute.
        self.timeline = PipelineTimeline().attach(self.stages, self.schedule)
        self.last_timelines: list[dict] = []
        self.last_bubble = 0.0

    def _scaled_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_sum(logits, labels) * self.scale

    @property
    def holds_loss(self) -> bool:
        """Whether this rank holds the last stage, where the losses are computed."""
        return self.n_stages - 1 in self.ids

    def _peer(self, stage: int) -> int:
        return dist.get_global_rank(self.group, stage_owner(stage, self.cfg))

    def train(self, micro_batches: list[dict[str, torch.Tensor]], scale: float,
              context: AbstractContextManager) -> torch.Tensor:
        """Forward and backward of all micro-batches; returns this rank's sum of token losses
        (non-zero only where the last stage lives)."""
        batch = {k: torch.cat([mb[k] for mb in micro_batches]).to(self.device) for k in micro_batches[0]}
        self.scale = scale
        losses: list[torch.Tensor] = []
        has_first, has_last = 0 in self.ids, self.n_stages - 1 in self.ids
        args = (batch["input_ids"],) if has_first else ()
        kwargs = {"position_ids": batch["position_ids"]}
        self.timeline.step_begin()
        with context:
            self.schedule.step(*args, target=batch["labels"] if has_last else None,
                               losses=losses if has_last else None, **kwargs)
        self.timeline.step_end()
        with comm.paused():  # measurement traffic, not training traffic
            self.last_timelines = self.timeline.gather(self.group)
        self.last_bubble = step_bubble(self.last_timelines)
        if not has_last:
            return torch.zeros((), dtype=torch.float64)
        return sum(plain(l).detach().double().cpu() for l in losses) / scale

    @torch.no_grad()
    def evaluate(self, micro_batches: list[dict[str, torch.Tensor]],
                 context: Callable[[], AbstractContextManager]) -> torch.Tensor:
        """Sum of token losses over ``micro_batches`` by running the stages in order,
        sending activations to the next stage's rank; non-zero only on the last stage's rank."""
        total = torch.zeros((), dtype=torch.float64)
        modules = dict(zip(self.ids, self.parts))
        for part in self.parts:
            part.eval()
        for mb in micro_batches:
            mb = {k: v.to(self.device) for k, v in mb.items()}
            hidden = None
            for stage in range(self.n_stages):
                if stage not in modules:
                    continue
                if stage == 0:
                    inputs = mb["input_ids"]
                elif stage - 1 in modules:
                    inputs = hidden
                else:
                    inputs = torch.empty(self._activation_shape(mb), dtype=torch.float32, device=self.device)
                    dist.recv(inputs, src=self._peer(stage - 1), group=self.group)
                with context():
                    hidden = modules[stage](inputs, position_ids=mb["position_ids"])
                if stage == self.n_stages - 1:
                    with context():
                        total += plain(self.loss_sum(hidden, mb["labels"])).double().cpu()
                elif stage + 1 not in modules:
                    dist.send(hidden.float().contiguous(), dst=self._peer(stage + 1), group=self.group)
        for part in self.parts:
            part.train()
        return total

    def _activation_shape(self, mb: dict[str, torch.Tensor]) -> tuple[int, int, int]:
        batch, seq = mb["input_ids"].shape
        return batch, seq // self.cfg.parallel.tp, self.cfg.model.dim  # sequence parallel shards seq

