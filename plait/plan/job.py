"""A ``plait train`` job as the planner sees it: its model, its training settings, the layout it
runs, and the memory its fullest rank is predicted to hold (``predicted_memory``, what a
benchmark compares with the trainer's own measurement).
"""

from __future__ import annotations

import dataclasses

from plait.config import JobConfig
from plait.errors import ConfigError
from plait.layout import Layout, resolve_schedule
from plait.plan.hardware import GPUS
from plait.plan.memory import Memory, memory_per_gpu
from plait.plan.spec import PlanModel, PlanTrain

CATEGORIES = ("params", "grads", "optimizer", "activations", "other")


def plan_model(cfg: JobConfig) -> PlanModel:
    """The job's model: plait's Llama blocks have SwiGLU MLPs."""
    m = cfg.model
    return PlanModel(n_layers=m.n_layers, dim=m.dim, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, ffn_dim=m.ffn_dim,
                     vocab_size=m.vocab_size, mlp="swiglu", tie_embeddings=m.tie_embeddings,
                     moe_experts=m.moe_experts, moe_top_k=m.moe_top_k, moe_ffn_dim=m.moe_ffn_dim,
                     moe_shared_ffn_dim=m.moe_shared_ffn_dim)


def plan_train(cfg: JobConfig) -> PlanTrain:
    """The job's training settings: plait's blocks run operator by operator unless compiled;
    ``micro_batch`` is left at the planner's default when the job says auto (the search picks
    one to rank layouts with)."""
    t = cfg.train
    extra = {} if t.micro_batch == "auto" else {"micro_batch": t.micro_batch}
    return PlanTrain(global_batch=t.global_batch, seq_len=t.seq_len, dtype="bf16" if t.dtype == "bf16" else "fp32",
                     cp_mode="ulysses" if cfg.parallel.cp_mode == "ulysses" else "ring",
                     kernels="fused" if t.compile else "eager", compile=t.compile, **extra)


def job_layout(cfg: JobConfig, world: int) -> Layout:
    """The layout ``cfg`` runs on ``world`` ranks, with its [memory] options. Raises ConfigError
    for what the planner does not model: HSDP (dp_replicate > 1), micro_batch = auto, and
    activation checkpointing other than none, op or full."""
    p, t, mem = cfg.parallel, cfg.train, cfg.memory
    if t.micro_batch == "auto":
        raise ConfigError("train.micro_batch = 'auto': the planner needs the micro-batch the trial picked")
    if t.activation_checkpointing not in ("none", "op", "full"):
        raise ConfigError(f"train.activation_checkpointing = '{t.activation_checkpointing}' is not modelled by the "
                          "planner (none, op and full are)")
    if p.dp_replicate > 1:
        raise ConfigError("parallel.dp_replicate > 1 (HSDP) is not modelled by the planner")
    model_parallel = p.tp * p.pp * p.cp
    if world % model_parallel:
        raise ConfigError(f"world size {world} is not divisible by parallel.tp x pp x cp = {model_parallel}")
    return Layout(tp=p.tp, pp=p.pp, vpp=p.pp_virtual_stages, dp=world // model_parallel, cp=p.cp, ep=p.ep,
                  micro_batch=t.micro_batch, zero=p.zero, recompute=t.activation_checkpointing,
                  schedule=resolve_schedule(p.pp_schedule, p.pp, p.pp_virtual_stages), offload=mem.offload,
                  activation_offload=mem.activation_offload, recompute_fraction=mem.recompute_fraction)


def _split(memory: Memory) -> dict[str, dict[str, float]]:
    device = {"params": memory.params, "grads": memory.grads, "optimizer": memory.optimizer,
              "activations": memory.activations, "other": memory.logits + memory.transient + memory.overhead}
    h = memory.host
    host = {"params": h.params, "grads": h.grads, "optimizer": h.optimizer, "activations": h.activations,
            "other": 0.0}
    return {"device": device, "host": host}


def predicted_memory(cfg: JobConfig, world: int) -> dict[str, dict[str, float]]:
    """Bytes the fullest rank of ``cfg`` on ``world`` ranks holds, on the "cpu" catalog entry with
    no allocator reservation or fragmentation (a CPU has no caching allocator):
    {"device": {"params", "grads", "optimizer", "activations", "other"}, "host": {the same}}.

    "activations" are the tensors saved for backward at the end of forward (every micro-batch in
    flight); "other" the logits (and their fp32 softmax) and the transient buffers (a recomputed
    block, gathered weights, activation offload's blocks in transfer). plait keeps fp32 weights,
    gradients and optimizer state whatever train.dtype says (bf16 is autocast, or FSDP2's
    compute copies), so the model states are counted in fp32 and the activations in the
    training dtype."""
    model, train, layout = plan_model(cfg), plan_train(cfg), job_layout(cfg, world)
    gpu = dataclasses.replace(GPUS["cpu"], reserved_bytes=0.0, fragmentation=0.0)
    out = _split(memory_per_gpu(model, train, layout, gpu))
    if train.dtype != "fp32":
        states = _split(memory_per_gpu(model, dataclasses.replace(train, dtype="fp32"), layout, gpu))
        for side in out:
            for key in ("params", "grads", "optimizer"):
                out[side][key] = states[side][key]
    return out
