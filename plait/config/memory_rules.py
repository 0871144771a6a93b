"""Which ``[memory]`` settings (offload, activation offload, token-wise recompute, micro-batch by
trial) a job may combine, checked before any rank starts."""

from __future__ import annotations

from plait.config.sections import JobConfig
from plait.errors import ConfigError


def validate_memory(cfg: JobConfig) -> None:
    """Refuse, in one line each, the combinations plait does not run."""
    mem, t, p, m = cfg.memory, cfg.train, cfg.parallel, cfg.model
    if mem.offload != "none" and cfg.lowbw.method != "none":
        raise ConfigError(f"memory.offload = '{mem.offload}' does not support lowbw.method = '{cfg.lowbw.method}' "
                          "(the outer loop keeps its own copies of the weights); set memory.offload = 'none'")
    if mem.offload == "params" and p.zero < 2:
        raise ConfigError(f"memory.offload = 'params' offloads FSDP2's sharded parameters and needs parallel.zero = 2 "
                          f"or 3 (got {p.zero}); with ZeRO-{p.zero} use memory.offload = 'optimizer'")
    if mem.offload == "params" and p.ep > 1:
        raise ConfigError("memory.offload = 'params' does not support parallel.ep > 1; use memory.offload = 'optimizer'")
    if mem.activation_offload > m.n_layers:
        raise ConfigError(f"memory.activation_offload = {mem.activation_offload} is above model.n_layers = "
                          f"{m.n_layers}; choose 1..{m.n_layers} blocks, -1 for every block, or 0")
    for key, on in (("memory.activation_offload", mem.activation_offload != 0),
                    ("memory.recompute_fraction", mem.recompute_fraction > 0)):
        if on and t.compile:
            raise ConfigError(f"{key} works on the eager blocks; it does not support train.compile = true")
    if mem.recompute_fraction > 0:
        _check_tokenwise(cfg)
    if t.micro_batch == "auto" and p.pp > 1:
        raise ConfigError("train.micro_batch = 'auto' does not support parallel.pp > 1 (the number of micro-batches "
                          "shapes the pipeline schedule); set train.micro_batch")


def _check_tokenwise(cfg: JobConfig) -> None:
    """Token-wise recompute splits a block's per-token work by token: plain softmax blocks only."""
    t, p, m = cfg.train, cfg.parallel, cfg.model
    why = None
    if t.activation_checkpointing != "none":
        why = f"train.activation_checkpointing = 'none' (got '{t.activation_checkpointing}'; they both choose what to recompute)"
    elif p.tp > 1:
        why = f"parallel.tp = 1 (got {p.tp}; sequence-parallel activations are split across ranks already)"
    elif m.moe_experts:
        why = "a dense model (MoE routing depends on which tokens travel together)"
    elif m.has_gla():
        why = "softmax attention layers only (model.layer_pattern has GLA layers)"
    if why:
        raise ConfigError(f"memory.recompute_fraction = {cfg.memory.recompute_fraction} needs {why}")


def needs_budget(cfg: JobConfig, on_cuda: bool) -> None:
    """On CPU, ``train.micro_batch = auto`` needs a memory budget to try against."""
    if cfg.train.micro_batch == "auto" and not on_cuda and cfg.memory.budget_gib == 0:
        raise ConfigError("train.micro_batch = 'auto' on CPU needs memory.budget_gib > 0 (CPU allocation does not "
                          "fail cleanly, so the budget is the limit a try must fit)")
