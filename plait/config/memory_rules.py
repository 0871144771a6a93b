"""Which ``[memory]`` settings (offload, activation offload, token-wise recompute, micro-batch by
trial) a job may combine, checked before any rank starts."""

from __future__ import annotations

from plait.config.sections import JobConfig
from plait.errors import ConfigError


def memory_problem(offload: str, activation_offload: int, recompute_fraction: float, *, checkpointing: str,
                   tp: int, zero: int, ep: int, moe: bool, gla: bool, compiled: bool) -> str | None:
    """Why plait's trainer does not run these [memory] options on this layout, or None. The one
    home of these rules: config validation raises the reason, the planner skips the candidate."""
    if offload == "params" and zero < 2:
        return (f"memory.offload = 'params' offloads FSDP2's sharded parameters and needs parallel.zero = 2 "
                f"or 3 (got {zero}); with ZeRO-{zero} use memory.offload = 'optimizer'")
    if offload == "params" and ep > 1:
        return "memory.offload = 'params' does not support parallel.ep > 1; use memory.offload = 'optimizer'"
    for key, on in (("memory.activation_offload", activation_offload != 0),
                    ("memory.recompute_fraction", recompute_fraction > 0)):
        if on and compiled:
            return f"{key} works on the eager blocks; it does not support train.compile = true"
    if recompute_fraction <= 0:
        return None
    # Token-wise recompute splits a block's per-token work by token: plain softmax blocks only.
    why = None
    if checkpointing != "none":
        why = f"train.activation_checkpointing = 'none' (got '{checkpointing}'; they both choose what to recompute)"
    elif tp > 1:
        why = f"parallel.tp = 1 (got {tp}; sequence-parallel activations are split across ranks already)"
    elif moe:
        why = "a dense model (MoE routing depends on which tokens travel together)"
    elif gla:
        why = "softmax attention layers only (model.layer_pattern has GLA layers)"
    return f"memory.recompute_fraction = {recompute_fraction:g} needs {why}" if why else None


def validate_memory(cfg: JobConfig) -> None:
    """Refuse, in one line each, the combinations plait does not run."""
    mem, t, p, m = cfg.memory, cfg.train, cfg.parallel, cfg.model
    if mem.offload != "none" and cfg.lowbw.method != "none":
        raise ConfigError(f"memory.offload = '{mem.offload}' does not support lowbw.method = '{cfg.lowbw.method}' "
                          "(the outer loop keeps its own copies of the weights); set memory.offload = 'none'")
    problem = memory_problem(mem.offload, mem.activation_offload, mem.recompute_fraction,
                             checkpointing=t.activation_checkpointing, tp=p.tp, zero=p.zero, ep=p.ep,
                             moe=bool(m.moe_experts), gla=m.has_gla(), compiled=t.compile)
    if problem:
        raise ConfigError(problem)
    if mem.activation_offload > m.n_layers:
        raise ConfigError(f"memory.activation_offload = {mem.activation_offload} is above model.n_layers = "
                          f"{m.n_layers}; choose 1..{m.n_layers} blocks, -1 for every block, or 0")
    if t.micro_batch == "auto" and p.pp > 1:
        raise ConfigError("train.micro_batch = 'auto' does not support parallel.pp > 1 (the number of micro-batches "
                          "shapes the pipeline schedule); set train.micro_batch")


def needs_budget(cfg: JobConfig, on_cuda: bool) -> None:
    """On CPU, ``train.micro_batch = auto`` needs a memory budget to try against."""
    if cfg.train.micro_batch == "auto" and not on_cuda and cfg.memory.budget_gib == 0:
        raise ConfigError("train.micro_batch = 'auto' on CPU needs memory.budget_gib > 0 (CPU allocation does not "
                          "fail cleanly, so the budget is the limit a try must fit)")
