"""Layout rules of a job (degrees, heads, stages, schedules, experts, context parallel)."""

from __future__ import annotations

from plait.config.sections import JobConfig
from plait.errors import ConfigError


PP_MULTI_STAGE = ("interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble", "zbv", "dualpipev")
PP_V_SHAPED = ("zbv", "dualpipev")


def pp_stage_layers(cfg: JobConfig) -> list[int] | None:
    """Layers per pipeline stage from ``parallel.pp_split``, or None when it is empty (balance)."""
    text = cfg.parallel.pp_split.strip()
    if not text:
        return None
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"parallel.pp_split = {text!r} is not a comma-separated list of integers") from None
    stages = cfg.parallel.pp * cfg.parallel.pp_virtual_stages
    if len(counts) != stages or min(counts) < 1 or sum(counts) != cfg.model.n_layers:
        raise ConfigError(
            f"parallel.pp_split = {text!r} must list {stages} stage sizes (pp x pp_virtual_stages), "
            f"each >= 1, summing to model.n_layers = {cfg.model.n_layers}"
        )
    return counts


def validate_model_parallel(cfg: JobConfig, dp: int) -> None:
    """Tensor and pipeline parallel checks: heads split over tp, layers over the stages."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    kv = m.n_kv_heads or m.n_heads
    if m.n_heads % p.tp or kv % p.tp:
        raise ConfigError(
            f"parallel.tp = {p.tp} must divide model.n_heads = {m.n_heads} and the KV heads ({kv})"
        )
    if p.tp > 1 and (m.ffn_dim % p.tp or t.seq_len % p.tp):
        raise ConfigError(
            f"parallel.tp = {p.tp} must divide model.ffn_dim = {m.ffn_dim} and train.seq_len = {t.seq_len} "
            "(sequence parallel splits the sequence)"
        )
    shard = dp // p.dp_replicate if p.dp_shard == -1 else p.dp_shard
    # Context-parallel ranks hold the same weights, so they join the data-parallel reduction.
    replicated = shard * p.cp == 1 or p.zero < 2
    # lowbw workers (dp_replicate groups) exchange no gradients: only dp_shard x cp counts then.
    synced = (shard if cfg.lowbw.method != "none" else dp) * p.cp
    if p.tp > 1 and synced > 1 and replicated:
        raise ConfigError(
            f"parallel.tp = {p.tp} with replicated data parallelism (parallel.zero = {p.zero}, dp_shard = "
            f"{p.dp_shard}) is not supported; use parallel.zero = 2 or 3 with dp_shard > 1"
        )
    validate_context_parallel(cfg)
    validate_experts(cfg, shard)
    if (p.tp > 1 or p.pp > 1) and m.tie_embeddings:
        raise ConfigError("model.tie_embeddings = true is not supported with parallel.tp > 1 or parallel.pp > 1")
    v = p.pp_virtual_stages
    if p.pp_schedule in PP_V_SHAPED and p.pp > 1 and v != 2:
        raise ConfigError(f"parallel.pp_schedule = '{p.pp_schedule}' needs parallel.pp_virtual_stages = 2 (got {v})")
    if p.pp_schedule not in PP_MULTI_STAGE and v != 1:
        raise ConfigError(
            f"parallel.pp_schedule = '{p.pp_schedule}' runs one stage per rank; parallel.pp_virtual_stages "
            f"must be 1 (got {v}); use one of {', '.join(PP_MULTI_STAGE)} for several"
        )
    if p.pp == 1:
        if cfg.metrics.profile_pipeline:
            raise ConfigError("--profile-pipeline (metrics.profile_pipeline) needs parallel.pp > 1")
        return
    stages = p.pp * v
    if stages > m.n_layers:
        raise ConfigError(
            f"parallel.pp x parallel.pp_virtual_stages = {stages} stages is more than model.n_layers = {m.n_layers}"
        )
    pp_stage_layers(cfg)
    micro = t.global_batch // (t.micro_batch * dp)
    schedule = p.pp_schedule
    if schedule in ("1f1b", "zbv") and micro < p.pp:
        problem = f"at least parallel.pp = {p.pp}"
    elif schedule == "dualpipev" and micro < 2 * p.pp:
        problem = f"at least 2 x parallel.pp = {2 * p.pp}"
    elif schedule in ("interleaved_1f1b", "interleaved_zero_bubble") and micro % p.pp:
        problem = f"a multiple of parallel.pp = {p.pp}"
    else:
        return
    raise ConfigError(
        f"parallel.pp_schedule = '{schedule}' needs {problem} micro-batches per step; "
        f"train.global_batch / (train.micro_batch x dp) = {t.global_batch} / ({t.micro_batch} x {dp}) = {micro}"
    )


def validate_experts(cfg: JobConfig, dp_shard: int) -> None:
    """Mixture-of-experts fields fit together and with the layout."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if not m.moe_experts:
        if p.ep > 1:
            raise ConfigError(f"parallel.ep = {p.ep} needs a mixture-of-experts model (model.moe_experts > 0)")
        return
    if m.moe_top_k > m.moe_experts:
        raise ConfigError(
            f"model.moe_top_k = {m.moe_top_k} is larger than model.moe_experts = {m.moe_experts}"
        )
    if p.cp > 1:
        raise ConfigError("mixture-of-experts models (model.moe_experts > 0) do not support parallel.cp > 1 yet")
    if cfg.moe.balance_scope == "global_batch" and t.activation_checkpointing != "none":
        raise ConfigError(
            "moe.balance_scope = 'global_batch' with train.activation_checkpointing = "
            f"'{t.activation_checkpointing}' would count recomputed tokens twice; use 'none' or "
            "moe.balance_scope = 'micro_batch'"
        )
    if p.ep == 1:
        return
    if m.moe_experts % p.ep:
        raise ConfigError(f"model.moe_experts = {m.moe_experts} is not divisible by parallel.ep = {p.ep}")
    if dp_shard % p.ep or p.zero < 2:
        raise ConfigError(
            f"parallel.ep = {p.ep} must divide the sharded data-parallel degree (dp_shard = {dp_shard}) with "
            f"parallel.zero = 2 or 3 (got {p.zero}): expert ranks are FSDP ranks"
        )


def cp_degrees(cfg: JobConfig) -> tuple[int, int]:
    """(ring degree, Ulysses degree) of the context-parallel layout; their product is cp."""
    p = cfg.parallel
    if p.cp_mode == "ulysses":
        return 1, p.cp
    if p.cp_mode == "hybrid":
        return p.cp // p.cp_ulysses, p.cp_ulysses
    return p.cp, 1


def validate_context_parallel(cfg: JobConfig) -> None:
    """The sequence splits into the cp layout's chunks, and Ulysses can split the heads."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if p.cp == 1:
        return
    if p.cp_mode == "hybrid" and (p.cp % p.cp_ulysses or not 1 < p.cp_ulysses < p.cp):
        raise ConfigError(
            f"parallel.cp_mode = 'hybrid' needs parallel.cp_ulysses strictly between 1 and parallel.cp = {p.cp} "
            f"and dividing it (got {p.cp_ulysses}); use cp_mode = 'ring' or 'ulysses' for a single kind"
        )
    chunks = 2 * p.cp if p.cp_shard == "zigzag" else p.cp
    if t.seq_len % (chunks * p.tp):
        raise ConfigError(
            f"train.seq_len = {t.seq_len} must be a multiple of {chunks * p.tp}: parallel.cp_shard = "
            f"'{p.cp_shard}' cuts it into {chunks} chunks for parallel.cp = {p.cp}"
            + (f", and sequence parallel splits each rank's part over parallel.tp = {p.tp}" if p.tp > 1 else "")
        )
    _, ulysses = cp_degrees(cfg)
    if ulysses == 1:
        return
    heads, kv_heads = m.n_heads // p.tp, (m.n_kv_heads or m.n_heads) // p.tp
    if heads % ulysses or (kv_heads % ulysses and ulysses % kv_heads):
        raise ConfigError(
            f"Ulysses degree {ulysses} (parallel.cp_mode = '{p.cp_mode}') must divide the attention heads per "
            f"tensor-parallel rank ({heads}), and divide or be a multiple of the KV heads per rank ({kv_heads})"
        )
