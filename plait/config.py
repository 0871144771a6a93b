"""Typed job config: TOML file + dotted command-line overrides, validated before any rank starts.

Every field lives in one section dataclass below; its name is the same in the TOML file, on the
command line (``--train.steps 200``), in the code and in the docs. Range limits and allowed
choices are declared next to the field (``metadata``) so the validator and the README agree.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

from plait.errors import ConfigError


def _f(default: Any, doc: str, **limits: Any) -> Any:
    """A config field with its one-line doc and optional ``min``/``max``/``gt`` limits."""
    return field(default=default, metadata={"doc": doc, **limits})


@dataclass
class RunConfig:
    dir: str = _f("runs/default", "output folder: metrics, checkpoints, plots, resolved config")


@dataclass
class ModelConfig:
    vocab_size: int = _f(0, "vocabulary size; 0 takes the tokenizer's", min=0)
    dim: int = _f(256, "hidden size", min=1)
    n_layers: int = _f(6, "transformer blocks", min=1)
    n_heads: int = _f(8, "attention (query) heads", min=1)
    n_kv_heads: int = _f(0, "key/value heads (GQA/MQA); 0 means n_heads", min=0)
    ffn_dim: int = _f(768, "SwiGLU hidden size", min=1)
    max_seq_len: int = _f(2048, "longest sequence the model accepts", min=1)
    rope_theta: float = _f(10000.0, "RoPE base", gt=0)
    rope_scaling: Literal["none", "llama3"] = _f("none", "RoPE frequency scaling")
    rope_factor: float = _f(8.0, "llama3 scaling: factor", gt=0)
    rope_low_freq_factor: float = _f(1.0, "llama3 scaling: low-frequency factor", gt=0)
    rope_high_freq_factor: float = _f(4.0, "llama3 scaling: high-frequency factor", gt=0)
    rope_original_max_seq_len: int = _f(8192, "llama3 scaling: original context", min=1)
    norm_eps: float = _f(1e-5, "RMSNorm epsilon", gt=0)
    qkv_bias: bool = _f(False, "bias on q/k/v projections (Qwen2)")
    tie_embeddings: bool = _f(False, "output layer shares the embedding matrix")
    init_std: float = _f(0.02, "std of the normal weight init", gt=0)
    moe_experts: int = _f(0, "routed experts per block (mixture of experts); 0 = a dense SwiGLU MLP", min=0)
    moe_top_k: int = _f(2, "experts each token is routed to", min=1)
    moe_ffn_dim: int = _f(0, "hidden size of each routed expert; 0 = ffn_dim", min=0)
    moe_shared_ffn_dim: int = _f(0, "hidden size of an always-on shared expert; 0 = none", min=0)
    moe_shared_gate: bool = _f(False, "scale the shared expert by a learned sigmoid gate (Qwen2-MoE)")
    moe_router: Literal["softmax", "sigmoid"] = _f(
        "softmax", "router scores: softmax over experts (Mixtral, Qwen2-MoE) or per-expert sigmoid (DeepSeek-V3)"
    )
    moe_norm_topk: bool = _f(True, "renormalize the top-k scores to sum to 1 (Mixtral: true; always for sigmoid)")
    moe_dispatch: Literal["dropless", "capacity"] = _f(
        "dropless", "dropless: every token reaches its experts; capacity: at most capacity_factor x fair share"
    )
    moe_capacity_factor: float = _f(1.25, "capacity dispatch: tokens per expert = factor x tokens x top_k / experts", gt=0)


@dataclass
class DataConfig:
    source: str = _f("demo", "'demo' (Shakespeare), a .txt/.md/.jsonl/.parquet file, or a folder")
    text_field: str = _f("text", "JSONL/parquet field holding the document text")
    tokenizer: str = _f(
        "bpe:4096",
        "'bpe:N' (byte-level BPE trained and cached), 'gpt2', a tokenizer.json, or a .model",
    )
    cache_dir: str = _f(".plait_cache", "where tokenizers and tokenized data are cached")
    val_fraction: float = _f(0.05, "share of documents held out for validation", min=0, max=0.5)
    doc_mask: bool = _f(True, "attention never crosses a document boundary in packed windows")
    batching: Literal["packed", "balanced"] = _f(
        "packed",
        "packed: fixed windows in corpus order; balanced: documents assigned to ranks and "
        "micro-batches to equalize attention+matmul work (needs doc_mask)",
    )


@dataclass
class TrainConfig:
    steps: int = _f(250, "optimizer steps", min=1)
    seed: int = _f(0, "seed for init, data order and sampling", min=0)
    seq_len: int = _f(256, "tokens per sequence", min=2)
    global_batch: int = _f(8, "sequences per optimizer step, over all data-parallel ranks", min=1)
    micro_batch: int = _f(4, "sequences per forward/backward on one rank", min=1)
    lr: float = _f(3e-3, "peak learning rate", gt=0)
    min_lr_ratio: float = _f(0.1, "final lr as a fraction of the peak", min=0, max=1)
    warmup_steps: int = _f(20, "linear warmup steps", min=0)
    schedule: Literal["cosine", "wsd", "constant"] = _f("cosine", "lr schedule after warmup")
    decay_fraction: float = _f(0.2, "wsd: share of steps spent decaying", min=0, max=1)
    weight_decay: float = _f(0.1, "AdamW weight decay (matrices only)", min=0)
    beta1: float = _f(0.9, "AdamW beta1", min=0, max=1)
    beta2: float = _f(0.95, "AdamW beta2", min=0, max=1)
    eps: float = _f(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float = _f(1.0, "max global grad norm; 0 disables clipping", min=0)
    dtype: Literal["fp32", "bf16"] = _f("fp32", "compute dtype (bf16 uses autocast)")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto picks cuda when available")
    activation_checkpointing: Literal["none", "full", "selective", "op"] = _f(
        "none", "recompute activations in backward: every block, every ac_every-th block, or all but matmuls"
    )
    ac_every: int = _f(2, "selective checkpointing: recompute every N-th block", min=1)
    compile: bool = _f(False, "torch.compile each transformer block (after TP and checkpointing, before FSDP)")
    eval_every: int = _f(50, "validate every N steps (and at the end); 0 only at the end", min=0)
    eval_batches: int = _f(8, "validation micro-batches in all (rounded up to a multiple of the dp degree)", min=1)
    sample_tokens: int = _f(64, "tokens generated as a sample at the end; 0 disables", min=0)
    sample_prompt: str = _f("ROMEO:", "prompt of the end-of-training sample")


@dataclass
class ParallelConfig:
    nproc: int = _f(2, "local ranks to spawn (ignored under torchrun)", min=1)
    dp_replicate: int = _f(1, "replicated data-parallel degree (DDP; HSDP's outer dim)", min=1)
    dp_shard: int = _f(-1, "sharded data-parallel degree (FSDP2); -1 fills the world", min=-1)
    zero: int = _f(3, "ZeRO stage over dp_shard: 0 DDP, 1 +sharded optimizer, 2 +sharded grads, 3 +sharded params", min=0, max=3)
    tp: int = _f(1, "tensor-parallel degree (with sequence parallel); divides heads and KV heads", min=1)
    pp: int = _f(1, "pipeline-parallel degree (stages across ranks)", min=1)
    pp_schedule: Literal[
        "gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble", "zbv", "dualpipev"
    ] = _f("1f1b", "pipeline schedule")
    pp_virtual_stages: int = _f(1, "pipeline stages per rank (interleaving); zbv and dualpipev use 2", min=1)
    pp_split: str = _f("", "layers per stage, e.g. '3,3,2'; empty balances by parameter count")
    ep: int = _f(1, "expert-parallel degree: each MoE layer's experts are split over ep of the dp_shard ranks", min=1)
    cp: int = _f(1, "context-parallel degree: every sequence is split over cp ranks", min=1)
    cp_mode: Literal["ring", "ulysses", "hybrid"] = _f(
        "ring", "ring: K/V blocks passed around the cp ranks; ulysses: all-to-all from sequence to heads; "
        "hybrid: Ulysses inside groups of cp_ulysses ranks, ring across them"
    )
    cp_ulysses: int = _f(2, "hybrid: the Ulysses (inner) degree; the ring degree is cp / cp_ulysses", min=1)
    cp_shard: Literal["zigzag", "contiguous"] = _f(
        "zigzag", "sequence split: zigzag (rank r holds chunks r and 2cp-1-r, equal causal work) or contiguous"
    )
    backend: Literal["auto", "gloo", "nccl"] = _f("auto", "auto: nccl on cuda, gloo on cpu")
    layout: Literal["manual", "auto"] = _f(
        "manual", "manual: the fields above as given; auto: plait plan picks tp, pp, cp, ep, zero, the schedule, "
        "train.micro_batch and train.activation_checkpointing for the world size, prints why, and uses them"
    )


@dataclass
class CommConfig:
    emulate_bandwidth: str = _f(
        "", "emulated link bandwidth in bytes/s: one number for every mesh dim, or 'dim=value,...' "
            "(e.g. 'dp_replicate=12.5e6' is 100 Mbit/s); empty: the real links"
    )
    emulate_latency: str = _f("", "emulated link latency in seconds, written as emulate_bandwidth; empty: none")


@dataclass
class MoEConfig:
    balance_scope: Literal["micro_batch", "global_batch"] = _f(
        "global_batch", "load-balancing loss counts tokens per expert over one micro-batch on one rank, or over "
        "all data-parallel ranks and the step's micro-batches so far"
    )
    aux_loss_coef: float = _f(0.01, "weight of the load-balancing loss n_experts x sum(f_i p_i)", min=0)
    z_loss_coef: float = _f(0.0, "weight of the router z-loss mean(logsumexp(logits)^2); 0 disables", min=0)


@dataclass
class ResilienceConfig:
    watch: bool = _f(True, "multi-rank local runs: per-rank watchdog + monitor that names a faulty rank and restarts")
    heartbeat_s: float = _f(0.5, "seconds between a rank's heartbeats", gt=0)
    hang_s: float = _f(5.0, "a hang is reported after max(hang_s, 3 x median step time) without progress", gt=0)
    slow_factor: float = _f(1.3, "a rank whose compute per step is this many times the others' median is slow", gt=1)
    slow_steps: int = _f(3, "consecutive slow steps before a slow rank is reported", min=1)
    evict_slow: bool = _f(False, "treat a slow rank as a fault: stop, restart from the last checkpoint")
    max_restarts: int = _f(3, "restarts from the last good checkpoint before giving up", min=0)
    on_nan: Literal["skip", "rollback"] = _f(
        "rollback", "non-finite loss or gradient: skip the step, or restart from the last checkpoint"
    )
    inject: str = _f("", "fault injection, e.g. 'crash:rank=1:step=20', 'hang:rank=2:step=30', "
                         "'hang_collective:rank=2:step=30', 'slow:rank=3:factor=2', 'nan:rank=0:step=15'")


@dataclass
class CheckpointConfig:
    every: int = _f(0, "save every N steps; 0 saves only at the end", min=0)
    keep: int = _f(2, "checkpoints kept on disk (oldest removed)", min=1)
    resume: bool = _f(False, "continue from the latest checkpoint in run.dir")
    init_from: str = _f(
        "", "start from these model weights (a checkpoint folder, a run dir's latest, or a 'plait convert' "
            "output) with a fresh optimizer and step 0; ignored when the run resumes"
    )


@dataclass
class MetricsConfig:
    log_every: int = _f(1, "write a metrics.jsonl line every N steps", min=1)
    peak_tflops: float = _f(1.0, "peak TFLOP/s of one rank's device, for mfu", gt=0)
    tensorboard: bool = _f(True, "write TensorBoard events when tensorboard is installed")
    plot: bool = _f(True, "write loss_curve.png at the end when matplotlib is installed")
    progress: bool = _f(True, "rich progress bar on rank 0 (plain lines when not a terminal)")
    profile_pipeline: bool = _f(False, "write pipeline_gantt.png of the last step (needs parallel.pp > 1)")


@dataclass
class LowBWConfig:
    method: Literal["none", "diloco", "streaming", "co2"] = _f(
        "none", "training over slow links: workers are the parallel.dp_replicate groups; none = every step synced"
    )
    inner_steps: int = _f(50, "H: local (inner AdamW) steps between two syncs of the same weights", min=1)
    outer_lr: float = _f(0.7, "outer SGD learning rate", gt=0)
    outer_momentum: float = _f(0.9, "outer SGD momentum (0 disables)", min=0, max=0.999)
    nesterov: bool = _f(True, "Nesterov outer momentum")
    fragments: int = _f(4, "streaming: P fragments (blocks in a strided pattern), synced H/P steps apart", min=1)
    overlap_steps: int = _f(0, "streaming: tau, steps a fragment's exchange runs alongside training before it is applied", min=0)
    mix: float = _f(0.5, "streaming: alpha, weight of the local fragment when the global one arrives (0 = replace)",
                    min=0, max=1)
    quantize: Literal["none", "fp16", "int8", "int4"] = _f("none", "outer gradients on the wire (summed in fp32)")
    quant_scale: Literal["block", "row"] = _f("block", "one scale per block of quant_block elements, or per row")
    quant_block: int = _f(128, "elements per scale with quant_scale = 'block'", min=1)
    error_feedback: bool = _f(False, "add what quantization dropped to the next outer gradient")
    co2_penalty: float = _f(0.0, "co2: staleness gap penalty lambda (0 disables)", min=0)
    co2_clip: float = _f(0.0, "co2: max norm of the outer momentum (0 disables)", min=0)
    check_sync: bool = _f(True, "after each sync compare a hash of the global weights across workers")


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    lowbw: LowBWConfig = field(default_factory=LowBWConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(JobConfig)}
_SECTION_TYPES = typing.get_type_hints(JobConfig)


def section_fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(_SECTION_TYPES[section])}


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(key: str, raw: Any, hint: Any, from_cli: bool) -> Any:
    """Turn ``raw`` into the field's type, or raise ConfigError naming the key and the type."""
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if raw not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{key} = {raw!r} is not allowed; choose one of {allowed}")
        return raw
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if from_cli and isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0"):
            return raw.lower() in ("true", "1")
        raise ConfigError(f"{key} = {raw!r} is not a boolean; use true or false")
    if hint is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{key} = {raw!r} is not an integer")
        if isinstance(raw, int):
            return raw
        if from_cli and isinstance(raw, str):
            try:
                return int(raw)
            except ValueError:
                pass
        raise ConfigError(f"{key} = {raw!r} is not an integer")
    if hint is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if from_cli and isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                pass
        raise ConfigError(f"{key} = {raw!r} is not a number")
    if hint is str:
        if isinstance(raw, str):
            return raw
        raise ConfigError(f"{key} = {raw!r} is not a string")
    raise ConfigError(f"{key}: unsupported field type {hint}")  # pragma: no cover


def _set(cfg: JobConfig, dotted: str, raw: Any, from_cli: bool) -> None:
    section, _, name = dotted.partition(".")
    if section not in SECTIONS or not name:
        options = [f"{s}.{n}" for s in SECTIONS for n in section_fields(s)]
        raise ConfigError(f"unknown config key '{dotted}'{_closest(dotted, options)}")
    fields = section_fields(section)
    if name not in fields:
        options = [f"{section}.{n}" for n in fields]
        raise ConfigError(f"unknown config key '{dotted}'{_closest(dotted, options)}")
    hint = typing.get_type_hints(type(getattr(cfg, section)))[name]
    value = _coerce(dotted, raw, hint, from_cli)
    meta = fields[name].metadata
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{dotted} = {value!r} is out of range; it must be >= {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{dotted} = {value!r} is out of range; it must be <= {meta['max']}")
    if "gt" in meta and value <= meta["gt"]:
        raise ConfigError(f"{dotted} = {value!r} is out of range; it must be > {meta['gt']}")
    setattr(getattr(cfg, section), name, value)


def load_toml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not valid TOML: {exc}") from None


def build_config(
    path: str | None = None,
    overrides: list[tuple[str, str]] | None = None,
    values: dict[str, Any] | None = None,
) -> JobConfig:
    """Defaults, then the TOML file, then ``values`` (typed), then CLI overrides (strings).

    Returns a validated JobConfig; raises ConfigError on the first problem.
    """
    cfg = JobConfig()
    if path is not None:
        for section, body in load_toml(path).items():
            if not isinstance(body, dict):
                raise ConfigError(
                    f"'{section}' in {path} must be a [section] table"
                    f"{_closest(section, list(SECTIONS))}"
                )
            for name, raw in body.items():
                _set(cfg, f"{section}.{name}", raw, from_cli=False)
    for dotted, raw in (values or {}).items():
        _set(cfg, dotted, raw, from_cli=False)
    for dotted, raw in overrides or []:
        _set(cfg, dotted, raw, from_cli=True)
    validate(cfg)
    return cfg


def validate(cfg: JobConfig, world_size: int | None = None) -> None:
    """Cross-field checks: the layout matches the world, batches and heads divide evenly."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    kv = m.n_kv_heads or m.n_heads
    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim = {m.dim} is not divisible by model.n_heads = {m.n_heads}")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError(f"model.dim / model.n_heads = {m.dim // m.n_heads} must be even (RoPE)")
    if m.n_heads % kv:
        raise ConfigError(
            f"model.n_heads = {m.n_heads} is not divisible by model.n_kv_heads = {kv}"
        )
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
    if p.layout == "auto":
        return  # the planner picks the layout (plait.plan.auto) and validates its choice
    world = world_size if world_size is not None else job_world_size(cfg)
    from plait.resilience.inject import parse_injection  # here: it imports torch.distributed

    injection = parse_injection(cfg.resilience.inject)
    if injection is not None and injection.rank >= world:
        raise ConfigError(f"resilience.inject names rank {injection.rank}; the job has ranks 0..{world - 1}")
    if injection is not None and injection.kind == "crash_sync" and cfg.lowbw.method == "none":
        raise ConfigError("resilience.inject = 'crash_sync:...' needs an outer sync: set lowbw.method")
    dp = resolve_dp(cfg, world)
    validate_model_parallel(cfg, dp)
    validate_lowbw(cfg)
    if t.global_batch % (t.micro_batch * dp):
        raise ConfigError(
            f"train.global_batch = {t.global_batch} must be a multiple of train.micro_batch "
            f"({t.micro_batch}) x data-parallel degree ({dp})"
        )


def validate_lowbw(cfg: JobConfig) -> None:
    """DiLoCo-family settings fit the layout: workers are the dp_replicate groups."""
    lb, p, t = cfg.lowbw, cfg.parallel, cfg.train
    if lb.method == "none":
        return
    if p.ep > 1:
        raise ConfigError(f"lowbw.method = '{lb.method}' does not support parallel.ep > 1")
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


# The names comm.register_* gives process groups: dims.MESH_DIMS, the expert mesh's edp and ep,
# the flattened dp, dp_cp, dp_shard_cp and cp, and comm's own world and other.
LINK_DIMS = ("pp", "dp_replicate", "dp_shard", "cp_ring", "cp_ulysses", "tp", "edp", "ep",
             "dp", "dp_cp", "dp_shard_cp", "cp", "world", "other")


def parse_link_values(name: str, text: str) -> dict[str, float]:
    """``comm.<name>`` (``emulate_bandwidth`` in bytes/s > 0, ``emulate_latency`` in seconds
    >= 0) as {mesh dim: value}; key ``"*"`` (a single number, or ``*=value``) is every dim not
    named; {} when empty.
    Raises ConfigError naming the field, the value and what is allowed."""
    unit, bound = ("bytes/s", "> 0") if name == "emulate_bandwidth" else ("seconds", ">= 0")
    text = text.strip()
    if not text:
        return {}
    pairs = [part.partition("=")[::2] for part in text.split(",")] if "=" in text else [("*", text)]
    values: dict[str, float] = {}
    for dim, raw in pairs:
        dim = dim.strip()
        try:
            value = float(raw)
        except ValueError:
            problem = f"{raw.strip()!r} is not a number"
        else:
            ok = math.isfinite(value) and (value > 0 if bound == "> 0" else value >= 0)
            problem = "" if ok else f"{raw.strip()} is not a finite number {bound}"
        if dim != "*" and dim not in LINK_DIMS:
            problem = f"unknown mesh dim {dim!r}"
        elif dim in values:
            problem = f"{dim!r} is given twice"
        if problem:
            raise ConfigError(
                f"comm.{name} = {text!r}: {problem}; use one number of {unit} ({bound}) for every mesh dim, "
                f"or 'dim=value,...' with dims {', '.join(LINK_DIMS)} (or * for the dims not named)"
            )
        values[dim] = value
    return values


def link_emulation(cfg: JobConfig) -> tuple[dict[str, float], dict[str, float]]:
    """(bandwidth in bytes/s, latency in s) per mesh dim from ``[comm]``: what
    comm.configure_emulation takes; two empty dicts when emulation is off."""
    return (parse_link_values("emulate_bandwidth", cfg.comm.emulate_bandwidth),
            parse_link_values("emulate_latency", cfg.comm.emulate_latency))


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


def torchrun_world_size() -> int | None:
    """WORLD_SIZE when torchrun (or another launcher) set up the rank environment, else None."""
    if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return int(os.environ["WORLD_SIZE"])
    return None


def job_world_size(cfg: JobConfig) -> int:
    """Ranks the job will run on: torchrun's world when launched by it, else parallel.nproc."""
    return torchrun_world_size() or cfg.parallel.nproc


def resolve_dp(cfg: JobConfig, world: int) -> int:
    """The data-parallel degree for ``world`` ranks (world / (tp x pp x cp)); raises ConfigError
    if the layout does not fill the world exactly."""
    p = cfg.parallel
    if p.dp_shard == 0:
        raise ConfigError("parallel.dp_shard = 0 is out of range; use -1 (fill) or >= 1")
    model_parallel = p.tp * p.pp * p.cp
    if world % model_parallel:
        raise ConfigError(
            f"world size {world} is not divisible by parallel.tp x pp x cp = {p.tp} x {p.pp} x {p.cp}"
        )
    dp_world = world // model_parallel
    if p.dp_shard == -1:
        if dp_world % p.dp_replicate:
            raise ConfigError(
                f"world size {world} / (tp x pp x cp = {model_parallel}) = {dp_world} is not divisible by "
                f"parallel.dp_replicate = {p.dp_replicate}"
            )
        return dp_world
    if p.dp_replicate * p.dp_shard * model_parallel != world:
        raise ConfigError(
            f"layout parallel.dp_replicate x dp_shard x tp x pp x cp = {p.dp_replicate} x {p.dp_shard} x "
            f"{p.tp} x {p.pp} x {p.cp} = {p.dp_replicate * p.dp_shard * model_parallel} does not match the world size {world}"
        )
    return dp_world


def to_toml(cfg: JobConfig) -> str:
    """The resolved config as TOML text (what ``plait train --print-config`` prints)."""
    lines: list[str] = []
    for section, body in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for name, value in body.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                text = repr(value)
            lines.append(f"{name} = {text}")
        lines.append("")
    return "\n".join(lines)


def reference_markdown() -> str:
    """The config reference table of the README, generated from the dataclasses above."""
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for section in SECTIONS:
        hints = typing.get_type_hints(_SECTION_TYPES[section])
        for name, fld in section_fields(section).items():
            hint = hints[name]
            if typing.get_origin(hint) is Literal:
                kind = " \\| ".join(str(c) for c in typing.get_args(hint))
            else:
                kind = hint.__name__
            default = fld.default
            text = "true" if default is True else "false" if default is False else repr(default) if isinstance(default, str) else str(default)
            rows.append(f"| `{section}.{name}` | {kind} | `{text}` | {fld.metadata['doc']} |")
    return "\n".join(rows)
