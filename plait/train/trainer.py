"""The training loop: one recipe every rank runs, single process or under a process group.

``Trainer`` builds the layout (mesh), the step guard (fault watching and injection, see
guard.py), the data, the model and its parallel wrapping, the optimizer, the lowbw outer loop
and the loader; ``run`` then loops step -> validate -> checkpoint -> log. A step: take this
rank's micro-batches, forward/backward each (gradient reduction only on the last), clip, AdamW,
schedule. The loss is the sum of token losses over the whole global batch divided by its token
count, so every layout computes the same number as the single-process reference.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel

from plait.config import JobConfig, link_emulation, to_toml
from plait.errors import CheckpointError
from plait.data import train_loader
from plait.infer.generate import generate
from plait.lowbw.diloco import build_outer_loop
from plait.lowbw.zo_step import mean_over_workers, step_schedule
from plait.models.llama import init_source, model_from_state
from plait.telemetry import collectives as comm
from plait.parallel.context_parallel import sequence_layout
from plait.parallel.data_parallel import set_gradient_sync
from plait.parallel.dims import ParallelDims, local_process_group
from plait.parallel.parallelize import parallelize_llama
from plait.telemetry.timeline import plot_gantt
from plait.parallel.zero import build_zero1_optimizer, state_bytes
from plait.train.loss import plain, token_loss_sum
from plait.train.pipeline_runner import PipelineRunner
from plait.checkpoint import store as ckpt
from plait.checkpoint.async_save import BackgroundSaver
from plait.checkpoint.hf_source import HFWeights
from plait.checkpoint.staging import ReusedStaging
from plait.checkpoint.starting import starting_weights
from plait.resilience.events import log_event
from plait.train import memory_report as memory
from plait.train.guard import StepGuard
from plait.train.moe_control import MoEControl
from plait.train.metrics import MetricsLogger, StepClock, step_record
from plait.telemetry.saved_activations import SavedActivations
from plait.train.host_optimizer import HostOffloadAdamW
from plait.train.micro_batch import pick_micro_batch
from plait.train.setup import load_data, resolve_device, validation_batches, with_vocab  # noqa: F401 (re-exported)
from plait.train.optim import build_optimizer, build_scheduler, clip_grad_norm


@dataclass
class TrainResult:
    """What a finished run returns on every rank (``sample`` and ``summary`` on rank 0)."""

    losses: dict[int, float] = field(default_factory=dict)
    val_losses: dict[int, float] = field(default_factory=dict)
    grad_norms: dict[int, float] = field(default_factory=dict)
    comm_bytes: dict[int, dict[str, int]] = field(default_factory=dict)  # this rank's, per mesh dim
    comm_op_bytes: dict[int, dict[str, int]] = field(default_factory=dict)  # this rank's, per "dim/op"
    model_state_bytes: dict[str, int] = field(default_factory=dict)  # this rank's params/grads/optimizer
    summary: dict[str, Any] = field(default_factory=dict)
    sample: str | None = None
    checkpoint: str | None = None


class Trainer:
    """Builds everything a run needs from ``cfg``, in order; ``run`` trains."""

    def __init__(self, cfg: JobConfig):
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.device = resolve_device(cfg)
        self.dims = self._build_layout(cfg)
        self.guard = StepGuard(cfg, self.rank, self.dims.local_rank("pp"))  # fault watching and injection
        self.clock = StepClock()
        self.data = load_data(cfg)
        self.cfg = cfg = with_vocab(cfg, self.data.tokenizer.vocab_size)
        start = (starting_weights(cfg.checkpoint.init_from, cfg.model)
                 if cfg.checkpoint.init_from and not cfg.checkpoint.resume else None)
        stage_ids = self._build_model(cfg, start if isinstance(start, HFWeights) else None)
        self.optimizer, self.scheduler = self._build_optimizer(cfg)
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.train.dtype == "bf16" else nullcontext()
        )
        if cfg.train.micro_batch == "auto":  # tried on this device and layout, before anything reads it
            self.cfg = cfg = replace(cfg, train=replace(cfg.train, micro_batch=pick_micro_batch(self)))
        if isinstance(start, str):  # a plait checkpoint: DCP reshards it into this layout
            # Before the outer loop copies the weights its workers start from.
            ckpt.load_model_weights(start, self.parts)
        # DiLoCo family: the outer loop around the inner steps (workers = dp_replicate groups).
        self.outer = build_outer_loop(cfg.lowbw, self.parts, self.dims, self.device, self.guard.injector, cfg.train.seed)
        n_micro = cfg.train.global_batch // (cfg.train.micro_batch * self.dims.dp)
        self.moe = (MoEControl(self.parts, cfg, n_micro, self.dims.group("grad"), self.dims.group("pp"), self.device)
                    if cfg.model.moe_experts else None)
        self.pipeline = (
            PipelineRunner(self.parts, stage_ids, cfg, self.dims, self.device, token_loss_sum, n_micro)
            if self.dims.pp_enabled else None
        )
        self._build_data(cfg)
        # checkpoint.async: the save in flight and its own process group (collective to create).
        self.saver = BackgroundSaver() if cfg.checkpoint.async_save else None
        self.start_step = 0
        self.model_state_bytes: dict[str, int] = {}
        if cfg.checkpoint.resume:
            self._resume()
        # The first step's activations kept for backward (memory.png); compiled blocks are opaque.
        self.meter = None if cfg.train.compile else SavedActivations()

    # ---- building

    def _build_layout(self, cfg: JobConfig) -> ParallelDims:
        """The mesh; every collective from here on is counted (ours, FSDP2's, DTensor's,
        pipelining's), named by the mesh dimension it runs on; slow links emulated if asked."""
        dims = ParallelDims.from_config(cfg, self.world)
        dims.build_mesh(self.device.type)
        groups = dims.labelled_groups()
        if groups:
            comm.install()
            for group, name in groups:
                comm.register_group(group, name)
        comm.configure_emulation(*link_emulation(cfg))  # slow links (comm.emulate_*); else off
        return dims

    def _build_model(self, cfg: JobConfig, hf_weights: HFWeights | None) -> list[int]:
        """Build this rank's part of the model in its layout, each rank materializing only its
        own shards (:func:`parallelize_llama`) from the seed's init or straight from a Hugging
        Face checkpoint; returns the global ids of this rank's stages."""
        fresh = init_source(cfg.model, cfg.train.seed)
        self.n_params = sum(math.prod(shape) for shape in fresh.shapes.values())
        self.parts, stage_ids = parallelize_llama(cfg, self.dims, self.device, hf_weights or fresh)
        self.model = self.parts[0]
        self._report_memory("after initialization", ("params", "peak"), None)
        return stage_ids

    def _report_memory(self, when: str, fields: tuple[str, ...], optimizer) -> None:
        """Collective: rank 0 prints what every rank holds (plait/train/memory_report.py), and
        after the first step draws memory.png."""
        saved = self.meter.peak if optimizer is not None and self.meter is not None else 0
        row = memory.measure(self.parts, optimizer, self.device, self.cfg.memory.offload, saved)
        rows = memory.gather(row, self.device)
        if self.rank != 0:
            return
        print(memory.report(rows, when, fields), flush=True)
        if optimizer is not None and self.cfg.metrics.plot:
            path = os.path.join(self.cfg.run.dir, "memory.png")
            mem = self.cfg.memory
            title = (f"memory after the first step: {self.dims.layout_name}, micro-batch {self.cfg.train.micro_batch}, "
                     f"offload {mem.offload}, activation offload {mem.activation_offload}, "
                     f"recompute fraction {mem.recompute_fraction:g}")
            if memory.plot_breakdown(rows, self.device, path, title):
                print(f"plait: memory breakdown written to {path}", flush=True)

    def _build_optimizer(self, cfg: JobConfig):
        host = cfg.memory.offload == "optimizer"
        if self.dims.fsdp_enabled and cfg.parallel.zero == 1:
            kind = HostOffloadAdamW if host else torch.optim.AdamW
            optimizer = build_zero1_optimizer(self.parts, cfg.train, self.dims.group("shard"), kind)
        else:
            optimizer = build_optimizer(self.parts, cfg.train, host)
        return optimizer, build_scheduler(optimizer, cfg.train)

    def _build_data(self, cfg: JobConfig) -> None:
        """This rank's loader and validation batches. Context-parallel ranks of one
        data-parallel rank read the same batches and keep their own tokens of each sequence."""
        dp_rank, dp = self.dims.local_rank("dp"), self.dims.dp
        self.loader = train_loader(cfg, self.data.train, dp_rank, dp)
        self.cp_layout, self.cp_rank = sequence_layout(cfg), self.dims.local_rank("cp")
        self.val = [self._local(mb) for mb in validation_batches(cfg, self.data, dp_rank, dp)]

    def _resume(self) -> None:
        folder = ckpt.latest_good_checkpoint(self.cfg.run.dir)
        if folder is None:
            raise CheckpointError(f"--resume: no checkpoint in '{ckpt.checkpoint_root(self.cfg.run.dir)}'")
        state = ckpt.load_checkpoint(folder, self.parts, self.optimizer, self._worker())
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # a ZeRO-1 optimizer state carries no lr; the schedule knows it
        self.loader.load_state_dict(state["loader"])
        if self.outer is not None:
            self.outer.load_state_dict(state["lowbw"])
        torch.set_rng_state(state["rng"])
        self.start_step = int(state["step"])
        if self.rank == 0:
            log_event(self.cfg.run.dir, "resume", rank=0, step=self.start_step, detail=os.path.basename(folder))

    # ---- one step

    def _local(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's tokens of a micro-batch: all of them without context parallelism."""
        if not self.dims.cp_enabled:
            return batch
        return {key: self.cp_layout.shard(value, self.cp_rank) for key, value in batch.items()}

    def _reduce(self, value: torch.Tensor, op=dist.ReduceOp.SUM, over_pp: bool = False,
                over_workers: bool = False) -> torch.Tensor:
        """Reduce a scalar over the data- and context-parallel ranks (of one lowbw worker), over
        the pipeline ranks with ``over_pp`` (losses live on the last stage only) and over the
        workers with ``over_workers``; identity on one process."""
        groups = [self.dims.group("grad"), self.dims.group("pp") if over_pp else None,
                  self.dims.group("dp_replicate") if over_workers and self.dims.workers else None]
        groups = [group for group in groups if group is not None]
        if not groups:
            return value
        value = value.to(self.device)
        begin = time.perf_counter()
        with comm.paused():  # bookkeeping, not training traffic
            for group in groups:
                dist.all_reduce(value, op=op, group=group)
        self.clock.bookkeeping_s += time.perf_counter() - begin  # waiting, not computing
        return value.cpu()

    def _forward_context(self) -> ExitStack:
        """Autocast (bf16) and loss parallel (tp), whichever apply, as one context."""
        stack = ExitStack()
        stack.enter_context(self.autocast)
        stack.enter_context(self._loss_context())
        return stack

    def _loss_context(self):
        """Vocabulary-sharded logits need torch's loss_parallel around loss and backward."""
        return loss_parallel() if self.dims.tp_enabled else nullcontext()

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of token cross-entropies of one micro-batch (unpipelined model)."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self.autocast:
            logits = self.model(batch["input_ids"], batch["position_ids"], doc_mask=self.cfg.data.doc_mask)
        return token_loss_sum(logits, batch["labels"])

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], step: int = 0) -> tuple[float, float]:
        """One optimizer step. Returns (global mean loss, global grad norm before clipping).

        A non-finite gradient norm skips the update (``resilience.on_nan = "skip"``) or
        raises NonFiniteError for the supervisor to roll back; the ranks whose own loss was
        not finite report it first."""
        for part in self.parts:
            part.train()
        micro_batches = [self._local(mb) for mb in micro_batches]
        if self.outer is not None and self.outer.zeroth_order:
            return self._zo_step(micro_batches, step)
        if self.moe is not None:
            self.moe.begin_step()
        local_tokens = sum(int((mb["labels"] != -100).sum()) for mb in micro_batches)
        global_tokens = float(self._reduce(torch.tensor(float(local_tokens))))
        # Data-parallel wrappers average gradients over the dp x cp ranks; scaling by their
        # number undoes that so gradients are of sum(loss)/global_tokens, the single-process
        # reference's objective.
        scale = self.guard.loss_scale(step, self.dims.grad_degree / max(global_tokens, 1.0))
        with self.meter if self.meter is not None else nullcontext():
            total = self._forward_backward(micro_batches, scale)
        self.guard.phase("optimizer")
        total = self.guard.loss_total(step, total, holds_loss=self.pipeline is None or self.pipeline.holds_loss)
        norm = self._optimizer_step(step)
        if self.dims.workers:  # report the loss over every worker's tokens
            global_tokens = float(self._reduce(torch.tensor(float(local_tokens)), over_workers=True))
        loss = float(self._reduce(total, over_pp=True, over_workers=True)) / max(global_tokens, 1.0)
        return loss, norm

    @torch.no_grad()
    def _zo_step(self, micro_batches: list[dict[str, torch.Tensor]], step: int) -> tuple[float, float]:
        """lowbw.method = zo (plait/lowbw/zo_step.py): losses at perturbed weights, no backward.
        Returns (this worker's mean loss over the evaluations, |mean directional derivative|)."""
        tokens = float(self._reduce(torch.tensor(float(sum(int((mb["labels"] != -100).sum()) for mb in micro_batches)))))

        def worker_loss() -> float:
            with self._loss_context():
                total = sum(plain(self._loss_sum(mb)).double().cpu() for mb in micro_batches)
            return float(self._reduce(torch.as_tensor(total, dtype=torch.float64))) / max(tokens, 1.0)
        loss, derivative = self.outer.step(step, worker_loss, self.scheduler.get_last_lr()[0])
        step_schedule(self.scheduler)
        return mean_over_workers(loss, tokens, self.outer.metrics_group), derivative

    def _forward_backward(self, micro_batches: list[dict[str, torch.Tensor]], scale: float) -> torch.Tensor:
        """Forward and backward of every micro-batch, gradients of ``scale`` x the loss sum,
        reduced across ranks on the last one only. Returns this rank's sum of token losses."""
        self.guard.phase("forward")
        if self.pipeline is not None:
            with self.autocast:
                return self.pipeline.train(micro_batches, scale, self._loss_context())
        total = torch.zeros((), dtype=torch.float64)
        for index, mb in enumerate(micro_batches):
            set_gradient_sync(self.model, index == len(micro_batches) - 1)
            with self._loss_context():
                self.guard.phase("forward")
                loss_sum = self._loss_sum(mb)
                self.guard.phase("backward")
                (loss_sum * scale).backward()
            total += plain(loss_sum).detach().double().cpu()
        return total

    def _optimizer_step(self, step: int) -> float:
        """Clip, update (unless the norm is not finite: the guard's policy) and schedule;
        returns the gradient norm before clipping."""
        params = [p for part in self.parts for p in part.parameters()]
        norm = clip_grad_norm(params, self.cfg.train.grad_clip, self.dims.group("pp"))
        if not math.isfinite(norm):
            self.guard.non_finite(step)
        else:
            self.optimizer.step()
        if not self.model_state_bytes:  # the first step is the first time all three exist
            self.model_state_bytes = state_bytes(self.parts, self.optimizer)
            self._report_memory("after the first step", memory.FIELDS, self.optimizer)
            self.meter = None
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over the fixed validation micro-batches of all dp ranks."""
        count = sum(int((mb["labels"] != -100).sum()) for mb in self.val)
        if self.pipeline is not None:
            total = self.pipeline.evaluate(self.val, self._forward_context)
        else:
            self.model.eval()
            total = torch.zeros((), dtype=torch.float64)
            for mb in self.val:
                with self._loss_context():
                    total += plain(self._loss_sum(mb)).double().cpu()
            self.model.train()
        total = self._reduce(total, over_pp=True, over_workers=True)
        count = float(self._reduce(torch.tensor(float(count), dtype=torch.float64), over_workers=True))
        return float(total) / max(count, 1.0)

    def _worker(self) -> tuple[str, Any] | None:
        """(checkpoint subfolder, process group) of this rank's lowbw worker; None otherwise."""
        if self.outer is None or self.outer.worker_group is None:
            return None
        return f"worker{self.dims.local_rank('dp_replicate')}", self.outer.worker_group

    def _rank_state(self, step: int) -> dict[str, Any]:
        state = {
            "step": step,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": torch.get_rng_state(),
        }
        if self.outer is not None:
            state["lowbw"] = self.outer.state_dict()
        return state

    def sample(self) -> str | None:
        """Collective: gather the full weights and generate a sample on rank 0."""
        t = self.cfg.train
        if t.sample_tokens == 0:
            return None
        state = ckpt.full_model_state(self.parts, self.dims.group("pp"))
        if self.rank != 0:
            return None
        single = model_from_state(self.cfg.model, state)
        tok = self.data.tokenizer
        ids = generate(single, tok.encode(t.sample_prompt) or [tok.eos_id], t.sample_tokens, seed=t.seed, eos_id=tok.eos_id)
        return t.sample_prompt + tok.decode(ids)

    # ---- the run

    def run(self) -> TrainResult:
        cfg, result = self.cfg, TrainResult()
        metrics = MetricsLogger(cfg, self.rank == 0, self.start_step)
        self._announce()
        if self.val and self.start_step == 0:
            # The loss before any update: the baseline every later validation is judged against.
            result.val_losses[0] = val = self.evaluate()
            metrics.log({"step": 0, "time": time.time(), "tokens": 0, "val_loss": val, "val_ppl": float(torch.tensor(val).exp())})
        for step in range(self.start_step + 1, cfg.train.steps + 1):
            record = self._step(step, result)
            if self.val and self._due(cfg.train.eval_every, step):
                self._validate(step, record, result)
            if self._due(cfg.checkpoint.every, step):
                self._checkpoint(step, result)
            if step % cfg.metrics.log_every == 0 or "val_loss" in record or step == cfg.train.steps:
                metrics.log(record)
            if self.pipeline is not None:
                metrics.timeline(step, self.pipeline.last_timelines, step == cfg.train.steps)
        if self.saver is not None:  # training is over when its last checkpoint is
            self._saved(self.saver.wait(), result)
        self._finish(result, metrics)
        return result

    def _due(self, every: int, step: int) -> bool:
        """Every ``every`` steps (0: never) and at the last step."""
        return bool(every and step % every == 0) or step == self.cfg.train.steps

    def _step(self, step: int, result: TrainResult) -> dict[str, Any]:
        """One training step, timed and watched; returns its metrics record."""
        self.clock.start()
        lr = self.scheduler.get_last_lr()[0]
        self.guard.begin_step(step)
        loss, norm = self.train_step(self.loader.next_step(), step)
        if self.outer is not None:
            self.guard.phase("sync")
            self.outer.after_step(step)
            if step == self.cfg.train.steps:
                self.outer.finish(step)
        self.guard.slow_down(step, self.clock.compute_s())
        elapsed, compute, traffic = self.clock.stop()
        self.guard.end_step(elapsed, compute)
        result.comm_bytes[step], result.comm_op_bytes[step] = traffic["comm_bytes"], traffic.get("comm_op_bytes", {})
        result.losses[step], result.grad_norms[step] = loss, norm
        record = step_record(self.cfg, step, loss, lr, norm, elapsed, traffic, self.loader.step_stats(),
                             self.world, self.device)
        if self.pipeline is not None:
            record["bubble"] = self.pipeline.last_bubble
        if self.outer is not None and self.outer.step_syncs:
            record["sync_bytes"] = sum(e["bytes"] for e in self.outer.step_syncs)
            record["sync_wait_s"] = sum(e["wait_s"] for e in self.outer.step_syncs)
        if self.moe is not None:
            record.update(self.moe.step_metrics(step))
        return record

    def _validate(self, step: int, record: dict[str, Any], result: TrainResult) -> None:
        self.guard.phase("eval")
        val = self.evaluate()
        result.val_losses[step] = val
        record["val_loss"], record["val_ppl"] = val, float(torch.tensor(val).exp())

    def _checkpoint(self, step: int, result: TrainResult) -> None:
        """Save (collective). With ``checkpoint.async`` this step's state is copied and written
        in the background once the previous save is published (its error surfaces here)."""
        cfg = self.cfg
        self.guard.phase("checkpoint")
        after_shards = self.guard.injector.during_save(step)
        if self.saver is None:
            folder = ckpt.save_checkpoint(
                cfg.run.dir, step, self.parts, self.optimizer, self._rank_state(step), cfg,
                self.data.tokenizer, cfg.checkpoint.keep, self._worker(), after_shards,
            )
            self._saved((step, folder), result)
            return
        rank_state = self._rank_state(step)

        def stage(staging: ReusedStaging) -> ckpt.StagedSave:
            return ckpt.stage_checkpoint(cfg.run.dir, step, self.parts, self.optimizer, rank_state, cfg,
                                         self.data.tokenizer, cfg.checkpoint.keep, staging=staging)
        self._saved(self.saver.save(stage, after_shards), result)

    def _saved(self, done: tuple[int, str] | None, result: TrainResult) -> None:
        """A save was published: the run's latest checkpoint, and its event (rank 0)."""
        if done is None:
            return
        step, result.checkpoint = done
        if self.rank == 0:
            log_event(self.cfg.run.dir, "checkpoint", rank=0, step=step, detail=os.path.basename(result.checkpoint))

    def _announce(self) -> None:
        if self.rank != 0:
            return
        cfg = self.cfg
        with open(os.path.join(cfg.run.dir, "config.toml"), "w") as fh:
            fh.write(to_toml(cfg))
        print(
            f"plait: {self.n_params / 1e6:.2f}M parameters, layout {self.dims.layout_name}, "
            f"{self.world} rank(s) on {self.device.type}, {len(self.data.train)} train windows, "
            f"steps {self.start_step + 1}..{cfg.train.steps}",
            flush=True,
        )

    def _finish(self, result: TrainResult, metrics: MetricsLogger) -> None:
        """Plots and model-state report (rank 0), the sample, the summary; stop watching."""
        cfg = self.cfg
        if self.rank == 0 and cfg.metrics.profile_pipeline and self.pipeline is not None:
            p = cfg.parallel
            path = os.path.join(cfg.run.dir, "pipeline_gantt.png")
            plot_gantt(self.pipeline.last_timelines, path,
                       f"{p.pp_schedule}: pp={p.pp}, v={p.pp_virtual_stages}, step {cfg.train.steps}")
            print(f"plait: pipeline Gantt chart written to {path}", flush=True)
        if self.rank == 0 and self.moe is not None and cfg.metrics.plot:
            path = os.path.join(cfg.run.dir, "expert_load.png")
            if self.moe.plot_load(path, f"expert load, {cfg.model.moe_experts} experts, top-{cfg.model.moe_top_k}"):
                print(f"plait: expert-load heat map written to {path}", flush=True)
        result.model_state_bytes = self.model_state_bytes
        if self.rank == 0 and self.model_state_bytes:
            mib = {k: v / 2**20 for k, v in self.model_state_bytes.items()}
            print(f"plait: model state on rank 0 (ZeRO-{cfg.parallel.zero if self.dims.fsdp_enabled else 0}): "
                  f"params {mib['params']:.2f} MiB, grads {mib['grads']:.2f} MiB, optimizer {mib['optimizer']:.2f} MiB",
                  flush=True)
        if self.outer is not None:
            self.outer.close()
        result.sample = self.sample()
        result.summary = metrics.close()
        self.guard.close()
        if self.rank == 0 and result.sample is not None:
            print(f"plait: sample: {result.sample!r}", flush=True)


def run_training(cfg: JobConfig) -> TrainResult:
    """Build everything from ``cfg`` and train (the process group, if any, already exists;
    a single process offloading parameters gets a process group of its own for FSDP2)."""
    with local_process_group(cfg.memory.offload == "params", resolve_device(cfg).type == "cuda"):
        return Trainer(cfg).run()
