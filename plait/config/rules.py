"""The layout rules of a job, read from its JobConfig: thin adapters onto plait.layout, where the
rules live once for the trainer and the planner (``plait plan`` ranks only what these accept)."""

from __future__ import annotations

from plait import layout
from plait.config.sections import JobConfig
from plait.layout import PP_MULTI_STAGE, PP_V_SHAPED

__all__ = [
    "PP_MULTI_STAGE", "PP_V_SHAPED", "cp_degrees", "degrees", "pp_stage_layers", "resolve_dp", "resolved_cp_shard",
    "validate_context_parallel", "validate_experts", "validate_model_parallel", "workload",
]


def degrees(cfg: JobConfig, world: int = 0) -> layout.Degrees:
    """The layout's degrees as plait.layout's rules take them (``world`` 0: not known here)."""
    p = cfg.parallel
    return layout.Degrees(
        world=world, tp=p.tp, pp=p.pp, vpp=p.pp_virtual_stages, cp=p.cp, ep=p.ep, dp_replicate=p.dp_replicate,
        dp_shard=p.dp_shard, zero=p.zero, schedule=p.pp_schedule, pp_split=p.pp_split, cp_mode=p.cp_mode,
        cp_ulysses=p.cp_ulysses, cp_shard=resolved_cp_shard(cfg), workers=cfg.lowbw.method != "none",
    )


def workload(cfg: JobConfig) -> layout.Workload:
    """What the layout rules need of the job's model and batch."""
    m, t = cfg.model, cfg.train
    return layout.Workload(
        n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, ffn_dim=m.ffn_dim, seq_len=t.seq_len,
        # train.micro_batch = auto is tried on the device among the divisors of the per-rank batch.
        global_batch=t.global_batch, micro_batch=1 if t.micro_batch == "auto" else t.micro_batch,
        moe_experts=m.moe_experts,
        tie_embeddings=m.tie_embeddings, activation_checkpointing=t.activation_checkpointing,
        moe_balance_scope=cfg.moe.balance_scope, profile_pipeline=cfg.metrics.profile_pipeline,
        gla_layers=m.mixers().count("gla"), gla_gate_rank=m.gla_gate_rank,
    )


def resolved_cp_shard(cfg: JobConfig) -> str:
    """parallel.cp_shard with 'auto' resolved: zigzag evens out causal softmax work; a model of
    GLA layers alone has even work per token, and a contiguous split gives LASP-2 one state per rank."""
    if cfg.parallel.cp_shard != "auto":
        return cfg.parallel.cp_shard
    return "zigzag" if cfg.model.has_softmax() else "contiguous"


def resolve_dp(cfg: JobConfig, world: int) -> int:
    """The data-parallel degree for ``world`` ranks (world / (tp x pp x cp)); raises ConfigError
    if the layout does not fill the world exactly."""
    return layout.resolve_dp(degrees(cfg, world))


def pp_stage_layers(cfg: JobConfig) -> list[int] | None:
    """Layers per pipeline stage from ``parallel.pp_split``, or None when it is empty (balance)."""
    return layout.pp_stage_layers(degrees(cfg), cfg.model.n_layers)


def cp_degrees(cfg: JobConfig) -> tuple[int, int]:
    """(ring degree, Ulysses degree) of the context-parallel layout; their product is cp."""
    return layout.cp_degrees(degrees(cfg))


def validate_model_parallel(cfg: JobConfig, dp: int) -> None:
    """Tensor and pipeline parallel checks: heads split over tp, layers over the stages."""
    layout.check_model_parallel(degrees(cfg), workload(cfg), dp)


def validate_experts(cfg: JobConfig, dp_shard: int) -> None:
    """Mixture-of-experts fields fit together and with the layout."""
    layout.check_experts(degrees(cfg), workload(cfg), dp_shard)


def validate_context_parallel(cfg: JobConfig) -> None:
    """The sequence splits into the cp layout's chunks, and Ulysses can split the heads."""
    layout.check_context_parallel(degrees(cfg), workload(cfg))
