"""Start the ranks: in this process, as N local processes on 127.0.0.1, or under torchrun.

Everything a user can get wrong is checked here, in the launching process, before any rank
starts (``preflight``), so a bad input costs one line and exit code 2, not N tracebacks.
``ranks`` starts, waits for and stops local rank processes; ``supervisor`` restarts them after a
fault the monitor names; ``rundir`` keeps a second run out of a run dir in use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from dataclasses import replace
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from plait.checkpoint import store as ckpt
from plait.checkpoint.starting import starting_weights
from plait.config import JobConfig, check_folder, resolve_dp, torchrun_world_size, validate
from plait.config.memory_rules import needs_budget
from plait.data import TokenizeReporter, prepare_data, train_loader
from plait.errors import CheckpointError, ConfigError
from plait.resilience.agent import finish_torchrun, join_torchrun, torchrun_attempt
from plait.launch.ranks import RankFailed, sigterm_as_interrupt, spawn, start_ranks, usable_cores  # noqa: F401 (the launch API)
from plait.launch.rundir import hold_run_dir, lock_run_dir
from plait.launch.supervisor import supervise
from plait.resilience.events import log_event
from plait.resilience.health import forget_health
from plait.resilience.watchdog import monitor_store
from plait.train.trackers import check_trackers
from plait.train.trainer import run_training, validation_batches, with_vocab
from plait.watch.server import PageServer, open_page


def under_torchrun() -> bool:
    """True when torchrun (or Slurm + a rendezvous script) already set up the rank environment."""
    return torchrun_world_size() is not None


def pick_backend(cfg: JobConfig) -> str:
    if cfg.parallel.backend != "auto":
        return cfg.parallel.backend
    if not on_cuda(cfg):
        return "gloo"
    # Offloaded state lives on the host: its reductions (gradient norms) need gloo beside NCCL.
    return "cpu:gloo,cuda:nccl" if cfg.memory.offload != "none" else "nccl"


def check_attention_kernel(cfg: JobConfig) -> None:
    """'fused' forces the CPU's fused attention kernels: refused for a job on CUDA."""
    if cfg.model.attention_kernel == "fused" and on_cuda(cfg):
        raise ConfigError("model.attention_kernel = 'fused' names the CPU's fused kernels; on CUDA use 'auto' "
                          "(per-document attention, ring blocks on the explicit math) or 'reference'")


def on_cuda(cfg: JobConfig) -> bool:
    """Whether the job's ranks will run on CUDA devices."""
    return cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())


def preflight(cfg: JobConfig, world_size: int, prepare: bool = True) -> JobConfig:
    """Validate everything that depends on files before ranks start; returns the config with
    ``model.vocab_size`` resolved. Builds the tokenizer and token caches as a side effect, so
    the ranks only read them."""
    validate(cfg, world_size)
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    if cfg.parallel.backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend = 'nccl' needs CUDA devices; use 'gloo' or 'auto'")
    check_attention_kernel(cfg)
    needs_budget(cfg, on_cuda(cfg))
    check_trackers(cfg)
    check_folder("run.dir", cfg.run.dir)
    check_folder("data.cache_dir", cfg.data.cache_dir)
    if cfg.checkpoint.resume:
        skipped: list[str] = []
        folder = ckpt.latest_good_checkpoint(cfg.run.dir, skipped)
        if folder is None:
            found = f": {skipped[0]}" if skipped else ""
            raise CheckpointError(f"--resume: no usable checkpoint in '{ckpt.checkpoint_root(cfg.run.dir)}'{found}")
        with open(os.path.join(folder, ckpt.MANIFEST)) as fh:
            step = json.load(fh)["step"]  # verified just above
        # A torchrun restart after the last checkpoint has nothing left to do, and that is success.
        if step >= cfg.train.steps and torchrun_attempt() == 0:
            raise ConfigError(
                f"--resume: the latest checkpoint ({os.path.basename(folder)}) is at step {step} and "
                f"train.steps = {cfg.train.steps} asks for no more; set train.steps above {step} to continue"
            )
        for problem in skipped:
            print(f"plait: warning: {problem}; resuming from {os.path.basename(folder)}", file=sys.stderr, flush=True)
    if not prepare:
        _check_initial_weights(cfg)
        return cfg
    reporter = TokenizeReporter()
    try:
        bundle = prepare_data(cfg.data, cfg.train.seq_len, cfg.train.seed, reporter)
    finally:
        reporter.close()
    dp = resolve_dp(cfg, world_size)
    # Both raise DataError when the splits are too small: the validation split for one eval
    # micro-batch per data-parallel rank, the train split for one step's global batch.
    # train.micro_batch = auto: its tries keep to micro-batches both splits serve; 1 must.
    sized = replace(cfg, train=replace(cfg.train, micro_batch=1)) if cfg.train.micro_batch == "auto" else cfg
    validation_batches(sized, bundle, 0, dp)
    train_loader(sized, bundle.train, 0, dp)
    vocab = bundle.tokenizer.vocab_size
    if cfg.model.vocab_size and cfg.model.vocab_size < vocab:
        raise ConfigError(
            f"model.vocab_size = {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({vocab}); use 0 to take the tokenizer's size"
        )
    cfg = with_vocab(cfg, vocab)
    if cfg.checkpoint.resume:  # the model (vocabulary resolved) must be the checkpoint's
        ckpt.check_same_model(folder, cfg.model, "--resume")
    _check_initial_weights(cfg)
    return cfg


def _check_initial_weights(cfg: JobConfig) -> None:
    if cfg.checkpoint.init_from and not cfg.checkpoint.resume:
        starting_weights(cfg.checkpoint.init_from, cfg.model)


def launch_training(cfg: JobConfig):
    """Run the training job for ``cfg`` in whichever way this process was started.

    Returns rank 0's TrainResult (this process's own under torchrun)."""

    if under_torchrun():
        return _train_under_torchrun(cfg)
    with sigterm_as_interrupt():
        page = _open_page(cfg)  # bound first: a port in use stops the run before any data work
        try:
            cfg = preflight(cfg, cfg.parallel.nproc)
            with hold_run_dir(cfg.run.dir), _serving(page):
                forget_health(cfg.run.dir)  # a previous run's rank rows; this run's monitor writes its own
                if cfg.parallel.nproc == 1:
                    return run_training(cfg)
                if cfg.resilience.watch:
                    return supervise(run_training, cfg, pick_backend(cfg))[0]
                return spawn(run_training, cfg.parallel.nproc, (cfg,), pick_backend(cfg))[0]
        finally:
            if page is not None:
                page.server_close()  # a run stopped before serving leaves no listening socket


def _open_page(cfg: JobConfig) -> PageServer | None:
    """The live page (``metrics.serve``), bound but not yet serving; None when off."""
    m = cfg.metrics
    return open_page(cfg.run.dir, m.host, m.serve, f"metrics.serve = {m.serve}") if m.serve else None


@contextlib.contextmanager
def _serving(page: PageServer | None) -> Iterator[None]:
    """Serve ``page`` from this process (the monitor's: it outlives a frozen rank) while inside."""
    if page is None:
        yield
        return
    print(f"plait: the live page is at {page.url}", flush=True)
    page.start()
    try:
        yield
    finally:
        page.stop()


def _train_under_torchrun(cfg: JobConfig):
    """One torchrun worker. Every rank checks the config and checkpoint; the data is prepared
    by rank 0 inside the trainer while the others wait, so no two ranks write the same cache
    file. After a torchrun restart the job resumes from its last good checkpoint, and plait's
    monitor (plait/resilience/agent.py) watches every attempt."""

    world, rank, restart = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), torchrun_attempt()
    if restart > 0 and ckpt.latest_good_checkpoint(cfg.run.dir) is not None:
        cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=True))
    preflight(cfg, world, prepare=False)
    if rank == 0:  # one holder for the whole job, whichever nodes share the run dir
        lock_run_dir(cfg.run.dir)  # held until this process ends; torchrun's next restart retakes it
        if restart == 0:
            forget_health(cfg.run.dir)
        page = _open_page(cfg)  # served by rank 0 until its process ends
        if page is not None:
            print(f"plait: the live page is at {page.url}", flush=True)
            page.start()
    if rank == 0 and restart > 0:
        where = "its last good checkpoint" if cfg.checkpoint.resume else "the start (no checkpoint yet)"
        log_event(cfg.run.dir, "restart", rank=0, detail=f"torchrun restart {restart}, from {where}")
    monitor = join_torchrun(cfg.resilience, cfg.run.dir)
    if not dist.is_initialized():
        dist.init_process_group(pick_backend(cfg), **_attempt_store(restart, rank, world))
    try:
        result = run_training(cfg)
        dist.barrier()
        if rank == 0 and cfg.resilience.watch:
            log_event(cfg.run.dir, "done", rank=0, detail=f"torchrun attempt {restart}")
            finish_torchrun(monitor_store(), monitor)
        return result
    finally:
        dist.destroy_process_group()


def _attempt_store(restart: int, rank: int, world: int) -> dict[str, Any]:
    """init_process_group arguments that keep torchrun restarts apart. torchrun's agent store
    lives for the whole job at the same address, so after a restart the new workers would
    read the previous attempt's gloo addresses and fail to connect; a prefix per restart
    avoids that. Empty when the store is not torchrun's agent store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                           timeout=timedelta(minutes=5))
    return {"store": dist.PrefixStore(f"plait/pg/{restart}/", client), "rank": rank, "world_size": world}
