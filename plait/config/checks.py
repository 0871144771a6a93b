"""Cross-field checks of a job, run before any rank starts: the layout fills the world, the
batch divides, the fault injection names a real rank, the slow-link settings fit.
"""

from __future__ import annotations

import os

from plait.config.injection import parse_injection
from plait.config.links import link_emulation
from plait.config.memory_rules import validate_memory
from plait.config.rules import degrees, resolve_dp, validate_model_parallel, workload
from plait.config.sections import JobConfig
from plait.errors import ConfigError
from plait.layout import check_batch, shard_degree


def validate(cfg: JobConfig, world_size: int | None = None) -> None:
    """Cross-field checks: the layout matches the world, batches and heads divide evenly."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    m.check_shape()  # the rules plait plan shares
    if (m.dim // m.n_heads) % 2:
        raise ConfigError(f"model.dim / model.n_heads = {m.dim // m.n_heads} must be even (RoPE)")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(
            f"train.seq_len = {t.seq_len} is above the model's limit model.max_seq_len = "
            f"{m.max_seq_len}"
        )
    if cfg.data.batching == "balanced" and not cfg.data.doc_mask:
        raise ConfigError(
            "data.batching = 'balanced' needs data.doc_mask = true: it packs several documents "
            "into one sequence, which must not attend to each other"
        )
    link_emulation(cfg)
    validate_checkpoint(cfg)
    validate_memory(cfg)
    if p.layout == "auto":
        return  # the planner picks the layout (plait.plan.auto) and validates its choice
    world = world_size if world_size is not None else job_world_size(cfg)
    injection = parse_injection(cfg.resilience.inject)
    if injection is not None and injection.rank >= world:
        raise ConfigError(f"resilience.inject names rank {injection.rank}; the job has ranks 0..{world - 1}")
    if injection is not None and injection.kind == "crash_sync" and cfg.lowbw.method == "none":
        raise ConfigError("resilience.inject = 'crash_sync:...' needs an outer sync: set lowbw.method")
    dp = resolve_dp(cfg, world)
    validate_model_parallel(cfg, dp)
    validate_precision(cfg, dp)
    validate_lowbw(cfg)
    check_batch(workload(cfg), dp)


def validate_checkpoint(cfg: JobConfig) -> None:
    """Asynchronous saves and ``crash_save`` injections fit the job."""
    c = cfg.checkpoint
    if c.async_save and cfg.lowbw.method != "none":
        # Each lowbw worker saves its own weights over its worker group; a background save
        # would need one more group per worker. Not supported: refuse rather than half-work.
        raise ConfigError(f"checkpoint.async = true does not support lowbw.method = '{cfg.lowbw.method}' "
                          "(each worker saves its own weights); set checkpoint.async = false")
    injection = parse_injection(cfg.resilience.inject)
    if injection is not None and injection.kind == "crash_save" and not saves_at(cfg, injection.step):
        raise ConfigError(f"resilience.inject = 'crash_save:...' names step {injection.step}, which saves no "
                          f"checkpoint (checkpoint.every = {c.every}, train.steps = {cfg.train.steps})")


def saves_at(cfg: JobConfig, step: int) -> bool:
    """Whether the trainer saves a checkpoint after ``step``: every ``checkpoint.every`` steps and at the end."""
    every = cfg.checkpoint.every
    return bool(every and step % every == 0) or step == cfg.train.steps


def validate_precision(cfg: JobConfig, dp: int) -> None:
    """A bf16 gradient reduction is FSDP's reduce-scatter of bf16 gradients: it needs both."""
    t, p = cfg.train, cfg.parallel
    if t.reduce_dtype == "fp32":
        return
    if t.dtype != "bf16":
        raise ConfigError(
            f"train.reduce_dtype = '{t.reduce_dtype}' needs train.dtype = 'bf16' (gradients are fp32 otherwise)"
        )
    shard = shard_degree(degrees(cfg), dp) * p.cp
    if shard <= 1 or p.zero < 2:
        raise ConfigError(
            f"train.reduce_dtype = '{t.reduce_dtype}' applies to FSDP's reduce-scatter; this layout does not shard "
            f"(dp_shard x cp = {shard}, parallel.zero = {p.zero}): use dp_shard > 1 with parallel.zero >= 2, or 'fp32'"
        )


def validate_lowbw(cfg: JobConfig) -> None:
    """DiLoCo-family settings fit the layout: workers are the dp_replicate groups."""
    lb, p, t = cfg.lowbw, cfg.parallel, cfg.train
    if lb.method == "none":
        return
    if p.ep > 1:
        raise ConfigError(f"lowbw.method = '{lb.method}' does not support parallel.ep > 1")
    if lb.method == "zo":
        if p.pp > 1:
            raise ConfigError("lowbw.method = 'zo' does not support parallel.pp > 1: its forward passes run whole "
                              "on each worker's ranks; use dp_shard, tp or cp inside a worker")
        return
    if t.steps % lb.inner_steps:
        raise ConfigError(
            f"train.steps = {t.steps} must be a multiple of lowbw.inner_steps = {lb.inner_steps}, "
            "so training ends on a sync"
        )
    if lb.method != "streaming":
        return
    if lb.inner_steps % lb.fragments or lb.fragments > cfg.model.n_layers:
        raise ConfigError(
            f"lowbw.fragments = {lb.fragments} must divide lowbw.inner_steps = {lb.inner_steps} "
            f"and be at most model.n_layers = {cfg.model.n_layers}"
        )
    if lb.overlap_steps >= lb.inner_steps // lb.fragments:
        raise ConfigError(
            f"lowbw.overlap_steps = {lb.overlap_steps} must be below lowbw.inner_steps / lowbw.fragments = "
            f"{lb.inner_steps // lb.fragments} (one fragment's exchange at a time)"
        )


def check_folder(key: str, path: str) -> None:
    """``path`` is a folder, or one can be made there: it is no file, lies below no file, and
    the nearest folder that exists is writable. Checked before anything is written."""
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is" if existing == os.path.abspath(path) else f"lies below '{existing}', which is"
        raise ConfigError(f"{key} = '{path}' {where} a file, not a folder; choose a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} = '{path}': the folder '{existing}' is not writable; choose a writable folder")


def torchrun_world_size() -> int | None:
    """WORLD_SIZE when torchrun (or another launcher) set up the rank environment, else None."""
    if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return int(os.environ["WORLD_SIZE"])
    return None


def job_world_size(cfg: JobConfig) -> int:
    """Ranks the job will run on: torchrun's world when launched by it, else parallel.nproc."""
    return torchrun_world_size() or cfg.parallel.nproc
