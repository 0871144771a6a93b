"""The job's typed sections: every field with its default, one-line doc and limits.

A field's name is the same in the TOML file, on the command line (``--train.steps 200``), in the
code and in the docs, except where the name users write is a Python keyword: then ``key=`` gives
it (``checkpoint.async`` is the attribute ``async_save``) and the parser maps one to the other. Range limits and allowed choices are declared next to the field
(``metadata``); the one parser (``config.parse``) checks them, so the validator and the README agree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from plait.errors import ConfigError


# torch.manual_seed takes any 64-bit value; numpy's generators any non-negative int.
SEED_MAX = 2**63 - 1


def field_spec(default: Any, doc: str, key: str | None = None, **limits: Any) -> Any:
    """A config field with its one-line doc and optional limits: ``min``/``max`` (inclusive),
    ``gt``/``lt`` (exclusive), ``nonempty`` (a string that must not be blank). An int field
    without ``max`` is bounded by the parser's INT_MAX. ``key``: the name users write when it
    cannot be the attribute's (a Python keyword such as ``async``)."""
    return field(default=default, metadata={"doc": doc, **({"key": key} if key else {}), **limits})


def config_key(fld: dataclasses.Field) -> str:
    """The name users write for field ``fld`` (TOML, command line, docs): its ``key`` if it has one."""
    return fld.metadata.get("key", fld.name)


@dataclass
class RunConfig:
    dir: str = field_spec("runs/default", "output folder: metrics, checkpoints, plots, resolved config", nonempty=True)


@dataclass
class ModelConfig:
    vocab_size: int = field_spec(0, "vocabulary size; 0 takes the tokenizer's", min=0)
    dim: int = field_spec(256, "hidden size", min=1)
    n_layers: int = field_spec(6, "transformer blocks", min=1)
    n_heads: int = field_spec(8, "attention (query) heads", min=1)
    n_kv_heads: int = field_spec(0, "key/value heads (GQA/MQA); 0 means n_heads", min=0)
    ffn_dim: int = field_spec(768, "SwiGLU hidden size", min=1)
    max_seq_len: int = field_spec(2048, "longest sequence the model accepts", min=1)
    rope_theta: float = field_spec(10000.0, "RoPE base", gt=0)
    rope_scaling: Literal["none", "llama3"] = field_spec("none", "RoPE frequency scaling")
    rope_factor: float = field_spec(8.0, "llama3 scaling: factor", gt=0)
    rope_low_freq_factor: float = field_spec(1.0, "llama3 scaling: low-frequency factor", gt=0)
    rope_high_freq_factor: float = field_spec(4.0, "llama3 scaling: high-frequency factor", gt=0)
    rope_original_max_seq_len: int = field_spec(8192, "llama3 scaling: original context", min=1)
    norm_eps: float = field_spec(1e-5, "RMSNorm epsilon", gt=0)
    qkv_bias: bool = field_spec(False, "bias on q/k/v projections (Qwen2)")
    tie_embeddings: bool = field_spec(False, "output layer shares the embedding matrix")
    init_std: float = field_spec(0.02, "std of the normal weight init", gt=0)
    attention_kernel: Literal["auto", "fused", "reference"] = field_spec(
        "auto", "fused: packed documents attended one by one with fused SDPA and ring blocks on the fused "
                "log-sum-exp kernel (CPU); reference: one dense document mask and explicit ring math; auto: "
                "fused, except ring blocks off the CPU"
    )
    moe_experts: int = field_spec(0, "routed experts per block (mixture of experts); 0 = a dense SwiGLU MLP", min=0)
    moe_top_k: int = field_spec(2, "experts each token is routed to", min=1)
    moe_ffn_dim: int = field_spec(0, "hidden size of each routed expert; 0 = ffn_dim", min=0)
    moe_shared_ffn_dim: int = field_spec(0, "hidden size of an always-on shared expert; 0 = none", min=0)
    moe_shared_gate: bool = field_spec(False, "scale the shared expert by a learned sigmoid gate (Qwen2-MoE)")
    moe_router: Literal["softmax", "sigmoid"] = field_spec(
        "softmax", "router scores: softmax over experts (Mixtral, Qwen2-MoE) or per-expert sigmoid (DeepSeek-V3)"
    )
    moe_norm_topk: bool = field_spec(True, "renormalize the top-k scores to sum to 1 (Mixtral: true; always for sigmoid)")
    moe_dispatch: Literal["dropless", "capacity"] = field_spec(
        "dropless", "dropless: every token reaches its experts; capacity: at most capacity_factor x fair share"
    )
    moe_capacity_factor: float = field_spec(1.25, "capacity dispatch: tokens per expert = factor x tokens x top_k / experts", gt=0)
    attention: Literal["softmax", "gla"] = field_spec(
        "softmax", "token mixer of every block: softmax attention, or gated linear attention (GLA: a fixed-size "
                   "state per head, O(s) in the sequence)"
    )
    layer_pattern: str = field_spec(
        "", "hybrid models: one letter per block, s (softmax) or g (GLA), repeated to n_layers (e.g. 'gggs'); "
            "empty: every block is model.attention"
    )
    gla_expand_k: float = field_spec(0.5, "GLA: total key/query width as a fraction of dim (d_k = dim x this / heads)",
                                     gt=0, max=16)
    gla_expand_v: float = field_spec(1.0, "GLA: total value width as a fraction of dim (d_v = dim x this / heads)",
                                     gt=0, max=16)
    gla_gate_rank: int = field_spec(16, "GLA: rank of the low-rank projection that makes the forget gate", min=1)
    gla_gate_norm: float = field_spec(16.0, "GLA: gate temperature; the gate is sigmoid(.)^(1/this)", gt=0)
    gla_chunk: int = field_spec(64, "GLA: chunk length of the chunked training form", min=1)
    gla_kernel: Literal["auto", "eager", "compiled"] = field_spec(
        "auto", "GLA chunk math: eager PyTorch, or torch.compile'd (inductor); auto: compiled on CUDA, eager elsewhere"
    )

    def check_shape(self) -> None:
        """The rules between model fields that ``plait train`` and ``plait plan`` share: heads divide
        the hidden size, key/value heads divide the heads, top-k fits in the experts."""
        kv = self.n_kv_heads or self.n_heads
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim = {self.dim} is not divisible by model.n_heads = {self.n_heads}")
        if self.n_heads % kv:
            raise ConfigError(f"model.n_heads = {self.n_heads} is not divisible by model.n_kv_heads = {kv}")
        if self.moe_experts and self.moe_top_k > self.moe_experts:
            raise ConfigError(
                f"model.moe_top_k = {self.moe_top_k} is larger than model.moe_experts = {self.moe_experts}"
            )
        self.mixers()
        if self.has_gla():
            for name, expand in (("gla_expand_k", self.gla_expand_k), ("gla_expand_v", self.gla_expand_v)):
                width = self.dim * expand
                if width != int(width) or int(width) % self.n_heads:
                    raise ConfigError(f"model.dim x model.{name} = {width:g} must be a whole multiple of "
                                      f"model.n_heads = {self.n_heads} (GLA head widths)")

    def mixers(self) -> tuple[str, ...]:
        """The token mixer of each block, 'softmax' or 'gla', from model.attention and
        model.layer_pattern; raises ConfigError on a bad pattern."""
        pattern = self.layer_pattern.strip().lower()
        if not pattern:
            return (self.attention,) * self.n_layers
        if set(pattern) - {"s", "g"} or self.n_layers % len(pattern):
            raise ConfigError(
                f"model.layer_pattern = {self.layer_pattern!r} must be letters s (softmax) and g (GLA) whose "
                f"length divides model.n_layers = {self.n_layers}"
            )
        names = {"s": "softmax", "g": "gla"}
        return tuple(names[pattern[i % len(pattern)]] for i in range(self.n_layers))

    def has_gla(self) -> bool:
        return "gla" in self.mixers()

    def has_softmax(self) -> bool:
        return "softmax" in self.mixers()

    def gla_dims(self) -> tuple[int, int]:
        """(d_k, d_v): the key and value width of one GLA head."""
        return int(self.dim * self.gla_expand_k) // self.n_heads, int(self.dim * self.gla_expand_v) // self.n_heads


@dataclass
class DataConfig:
    source: str = field_spec("demo", "'demo' (Shakespeare), a .txt/.md/.jsonl/.parquet file, or a folder", nonempty=True)
    text_field: str = field_spec("text", "JSONL/parquet field holding the document text", nonempty=True)
    tokenizer: str = field_spec(
        "bpe:4096",
        "'bpe:N' (byte-level BPE trained and cached), 'gpt2', a tokenizer.json, or a .model",
        nonempty=True,
    )
    cache_dir: str = field_spec(".plait_cache", "where tokenizers and tokenized data are cached", nonempty=True)
    workers: int = field_spec(0, "processes that build the token cache; 0 = the cores available", min=0)
    format: Literal["text", "chat"] = field_spec(
        "text", "text: each record is a document; chat: each jsonl/dataset record holds 'messages' (role, content), "
                "rendered with the chat template, and only the assistant's tokens count in the loss"
    )
    chat_template: str = field_spec(
        "", "chat: a .jinja template file, or 'builtin' for plait's own; empty = the tokenizer's own "
            "(tokenizer_config.json beside a tokenizer.json), or the built-in one for bpe:N and gpt2"
    )
    val_fraction: float = field_spec(0.05, "share of documents held out for validation", min=0, max=0.5)
    doc_mask: bool = field_spec(True, "attention never crosses a document boundary in packed windows")
    batching: Literal["packed", "balanced"] = field_spec(
        "packed",
        "packed: fixed windows in corpus order; balanced: documents assigned to ranks and "
        "micro-batches to equalize attention+matmul work (needs doc_mask)",
    )


@dataclass
class TrainConfig:
    steps: int = field_spec(250, "optimizer steps", min=1)
    seed: int = field_spec(0, "seed for init, data order and sampling", min=0, max=SEED_MAX)
    seq_len: int = field_spec(256, "tokens per sequence", min=2)
    global_batch: int = field_spec(8, "sequences per optimizer step, over all data-parallel ranks", min=1)
    micro_batch: int | Literal["auto"] = field_spec(
        4, "sequences per forward/backward on one rank; auto: before training, try growing micro-batches "
           "(forward, backward, optimizer step on the real layout) and keep the largest that fits the memory "
           "budget (memory.budget_gib, memory.headroom)", min=1)
    lr: float = field_spec(3e-3, "peak learning rate", gt=0)
    min_lr_ratio: float = field_spec(0.1, "final lr as a fraction of the peak", min=0, max=1)
    warmup_steps: int = field_spec(20, "linear warmup steps", min=0)
    schedule: Literal["cosine", "wsd", "constant"] = field_spec("cosine", "lr schedule after warmup")
    decay_fraction: float = field_spec(0.2, "wsd: share of steps spent decaying", min=0, max=1)
    weight_decay: float = field_spec(0.1, "AdamW weight decay (matrices only)", min=0)
    beta1: float = field_spec(0.9, "AdamW beta1", min=0, lt=1)  # AdamW refuses 1
    beta2: float = field_spec(0.95, "AdamW beta2", min=0, lt=1)
    eps: float = field_spec(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float = field_spec(1.0, "max global grad norm; 0 disables clipping", min=0)
    dtype: Literal["fp32", "bf16"] = field_spec(
        "fp32", "compute dtype; bf16: FSDP gathers and computes bf16 parameters (fp32 master weights and "
                "optimizer state), other layouts autocast"
    )
    reduce_dtype: Literal["fp32", "bf16"] = field_spec(
        "fp32", "dtype of FSDP's gradient reduce-scatter; bf16 halves its bytes (needs train.dtype = bf16 and FSDP)"
    )
    device: Literal["auto", "cpu", "cuda"] = field_spec("auto", "auto picks cuda when available")
    activation_checkpointing: Literal["none", "full", "selective", "op"] = field_spec(
        "none", "recompute activations in backward: every block, every ac_every-th block, or all but matmuls"
    )
    ac_every: int = field_spec(2, "selective checkpointing: recompute every N-th block", min=1)
    compile: bool = field_spec(False, "torch.compile each transformer block (after TP and checkpointing, before FSDP)")
    eval_every: int = field_spec(50, "validate every N steps (and at the end); 0 only at the end", min=0)
    eval_batches: int = field_spec(8, "validation micro-batches in all (rounded up to a multiple of the dp degree)", min=1)
    sample_tokens: int = field_spec(64, "tokens generated as a sample at the end; 0 disables", min=0)
    sample_prompt: str = field_spec("ROMEO:", "prompt of the end-of-training sample")


@dataclass
class ParallelConfig:
    nproc: int = field_spec(2, "local ranks to spawn (ignored under torchrun)", min=1)
    dp_replicate: int = field_spec(1, "replicated data-parallel degree (DDP; HSDP's outer dim)", min=1)
    dp_shard: int = field_spec(-1, "sharded data-parallel degree (FSDP2); -1 fills the world", min=-1)
    zero: int = field_spec(3, "ZeRO stage over dp_shard: 0 DDP, 1 +sharded optimizer, 2 +sharded grads, 3 +sharded params", min=0, max=3)
    tp: int = field_spec(1, "tensor-parallel degree (with sequence parallel); divides heads and KV heads", min=1)
    pp: int = field_spec(1, "pipeline-parallel degree (stages across ranks)", min=1)
    pp_schedule: Literal[
        "gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble", "zbv", "dualpipev"
    ] = field_spec("1f1b", "pipeline schedule")
    pp_virtual_stages: int = field_spec(1, "pipeline stages per rank (interleaving); zbv and dualpipev use 2", min=1)
    pp_split: str = field_spec("", "layers per stage, e.g. '3,3,2'; empty balances by parameter count")
    ep: int = field_spec(1, "expert-parallel degree: each MoE layer's experts are split over ep of the dp_shard ranks", min=1)
    cp: int = field_spec(1, "context-parallel degree: every sequence is split over cp ranks", min=1)
    cp_mode: Literal["auto", "ring", "ulysses", "hybrid", "lasp2"] = field_spec(
        "auto", "softmax layers: ring (K/V blocks passed around the cp ranks), ulysses (all-to-all from sequence "
        "to heads) or hybrid (Ulysses inside groups of cp_ulysses ranks, ring across them); GLA layers always "
        "use lasp2 (one all-gather of per-rank states per layer), the only choice for a model of GLA layers "
        "alone; auto: ring for softmax layers"
    )
    cp_ulysses: int = field_spec(2, "hybrid: the Ulysses (inner) degree; the ring degree is cp / cp_ulysses", min=1)
    cp_shard: Literal["auto", "zigzag", "contiguous"] = field_spec(
        "auto", "sequence split: zigzag (rank r holds chunks r and 2cp-1-r, equal causal work) or contiguous; "
        "auto: zigzag when the model has softmax layers, contiguous for GLA alone (its work is even per token)"
    )
    backend: Literal["auto", "gloo", "nccl"] = field_spec("auto", "auto: nccl on cuda, gloo on cpu")
    layout: Literal["manual", "auto"] = field_spec(
        "manual", "manual: the fields above as given; auto: plait plan picks tp, pp, cp, ep, zero, the schedule, "
        "train.micro_batch and train.activation_checkpointing for the world size, prints why, and uses them"
    )


@dataclass
class CommConfig:
    emulate_bandwidth: str = field_spec(
        "", "emulated link bandwidth in bytes/s: one number for every mesh dim, or 'dim=value,...' "
            "(e.g. 'dp_replicate=12.5e6' is 100 Mbit/s); empty: the real links"
    )
    emulate_latency: str = field_spec("", "emulated link latency in seconds, written as emulate_bandwidth; empty: none")


@dataclass
class MoEConfig:
    balance_scope: Literal["micro_batch", "global_batch"] = field_spec(
        "global_batch", "load-balancing loss counts tokens per expert over one micro-batch on one rank, or over "
        "all data-parallel ranks and the step's micro-batches so far"
    )
    aux_loss_coef: float = field_spec(0.01, "weight of the load-balancing loss n_experts x sum(f_i p_i)", min=0)
    z_loss_coef: float = field_spec(0.0, "weight of the router z-loss mean(logsumexp(logits)^2); 0 disables", min=0)


@dataclass
class ResilienceConfig:
    watch: bool = field_spec(True, "multi-rank local runs: per-rank watchdog + monitor that names a faulty rank and restarts")
    heartbeat_s: float = field_spec(0.5, "seconds between a rank's heartbeats", gt=0)
    hang_s: float = field_spec(5.0, "a hang is reported after max(hang_s, 3 x median step time) without progress", gt=0)
    slow_factor: float = field_spec(
        1.3, "a rank whose compute per step is this many times the median of its pipeline stage's other ranks is slow",
        gt=1,
    )
    slow_steps: int = field_spec(3, "consecutive slow steps before a slow rank is reported", min=1)
    evict_slow: bool = field_spec(False, "treat a slow rank as a fault: stop, restart from the last checkpoint")
    max_restarts: int = field_spec(3, "restarts from the last good checkpoint before giving up", min=0)
    on_nan: Literal["skip", "rollback"] = field_spec(
        "rollback", "non-finite loss or gradient: skip the step, or restart from the last checkpoint"
    )
    inject: str = field_spec("", "fault injection, e.g. 'crash:rank=1:step=20', 'hang:rank=2:step=30', "
                         "'hang_collective:rank=2:step=30', 'slow:rank=3:factor=2', 'nan:rank=0:step=15'")


@dataclass
class CheckpointConfig:
    every: int = field_spec(0, "save every N steps; 0 saves only at the end", min=0)
    keep: int = field_spec(2, "checkpoints kept on disk (oldest removed)", min=1)
    resume: bool = field_spec(False, "continue from the latest checkpoint in run.dir")
    async_save: bool = field_spec(
        False, "write checkpoints in the background while training goes on (one save in flight; the step's "
               "weights are copied first); not with lowbw", key="async"
    )
    init_from: str = field_spec(
        "", "start from these model weights with a fresh optimizer and step 0: a plait checkpoint folder, a run "
            "dir's latest, or a Hugging Face folder (config.json + safetensors; each rank reads only its shards); "
            "ignored when the run resumes"
    )


@dataclass
class MetricsConfig:
    log_every: int = field_spec(1, "write a metrics.jsonl line every N steps", min=1)
    peak_tflops: float = field_spec(1.0, "peak TFLOP/s of one rank's device, for mfu", gt=0)
    tensorboard: bool = field_spec(True, "write TensorBoard events when tensorboard is installed")
    plot: bool = field_spec(True, "write loss_curve.png at the end when matplotlib is installed")
    progress: bool = field_spec(True, "rich progress bar on rank 0 (plain lines when not a terminal)")
    profile_pipeline: bool = field_spec(False, "write pipeline_gantt.png of the last step (needs parallel.pp > 1)")
    serve: int = field_spec(0, "serve the live page on this port while training (0: off); see plait watch", min=0, max=65535)
    host: str = field_spec("127.0.0.1", "address the live page listens on; anything but loopback exposes it to the network",
                           nonempty=True)
    wandb: bool = field_spec(False, "log the metrics to Weights & Biases too (pip install 'plait[wandb]')")
    wandb_project: str = field_spec("plait", "W&B project", nonempty=True)
    wandb_mode: Literal["offline", "online"] = field_spec("offline", "offline writes run.dir/wandb, no account needed")
    mlflow: bool = field_spec(False, "log the metrics to MLflow too (pip install 'plait[mlflow]')")
    mlflow_uri: str = field_spec("", "MLflow tracking URI; empty: a file store in run.dir/mlruns")
    mlflow_experiment: str = field_spec("plait", "MLflow experiment name", nonempty=True)


@dataclass
class LowBWConfig:
    method: Literal["none", "diloco", "streaming", "co2", "zo"] = field_spec(
        "none", "training over slow links: workers are the parallel.dp_replicate groups; none = every step synced; "
                "zo = zeroth-order, one number per direction per step"
    )
    inner_steps: int = field_spec(50, "H: local (inner AdamW) steps between two syncs of the same weights", min=1)
    outer_lr: float = field_spec(0.7, "outer SGD learning rate", gt=0)
    outer_momentum: float = field_spec(0.9, "outer SGD momentum (0 disables)", min=0, max=0.999)
    nesterov: bool = field_spec(True, "Nesterov outer momentum")
    fragments: int = field_spec(4, "streaming: P fragments (blocks in a strided pattern), synced H/P steps apart", min=1)
    overlap_steps: int = field_spec(0, "streaming: tau, steps a fragment's exchange runs alongside training before it is applied", min=0)
    mix: float = field_spec(0.5, "streaming: alpha, weight of the local fragment when the global one arrives (0 = replace)",
                    min=0, max=1)
    quantize: Literal["none", "fp16", "int8", "int4"] = field_spec("none", "outer gradients on the wire (summed in fp32)")
    quant_scale: Literal["block", "row"] = field_spec("block", "one scale per block of quant_block elements, or per row")
    quant_block: int = field_spec(128, "elements per scale with quant_scale = 'block'", min=1)
    error_feedback: bool = field_spec(False, "add what quantization dropped to the next outer gradient")
    co2_penalty: float = field_spec(0.0, "co2: staleness gap penalty lambda (0 disables)", min=0)
    co2_clip: float = field_spec(0.0, "co2: max norm of the outer momentum (0 disables)", min=0)
    check_sync: bool = field_spec(True, "after each sync compare a hash of the global weights across workers")
    zo_eps: float = field_spec(1e-3, "zo: perturbation size epsilon of the central difference", gt=0)
    zo_samples: int = field_spec(1, "zo: random directions per step (each costs two forward passes)", min=1, max=1024)
    zo_bits: int = field_spec(8, "zo: bits of each exchanged directional derivative (stochastic rounding)", min=1, max=16)
    zo_params: Literal["all", "norms_and_output"] = field_spec(
        "all", "zo: the parameters trained; norms_and_output = the norm weights and the output layer (lower variance)")


@dataclass
class MemoryConfig:
    offload: Literal["none", "optimizer", "params"] = field_spec(
        "none", "model state in host memory: optimizer = AdamW moments and the update on the host, parameters "
                "and gradients stay on the device (ZeRO-Offload); params = FSDP2 CPU offload: sharded "
                "parameters, gradients and optimizer state on the host, the update on the host (ZeRO-Infinity "
                "to CPU), each block's parameters copied in for its forward and backward"
    )
    activation_offload: int = field_spec(
        0, "blocks whose tensors saved for backward go to host memory in forward and come back for their "
           "backward (pinned and prefetched one block ahead on CUDA): the first N blocks by layer index; "
           "-1 every block; 0 none", min=-1)
    recompute_fraction: float = field_spec(
        0.0, "token-wise recompute (MEMO): the share of each block's tokens whose per-token activations "
             "(projections, norms, MLP) are recomputed in backward instead of kept; 0 keeps all; "
             "needs train.activation_checkpointing = none", min=0, max=1)
    budget_gib: float = field_spec(
        0.0, "train.micro_batch = auto: device memory one rank may use, in GiB; required on CPU (allocation "
             "there does not fail cleanly); 0 on CUDA: the GPU's memory", min=0, max=1e6)
    headroom: float = field_spec(
        0.1, "train.micro_batch = auto keeps a try's peak at or below (1 - headroom) x the budget", min=0, lt=1)


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
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{section: {key users write: value}} (what config.toml holds)."""
        return {section.name: {config_key(f): getattr(body, f.name) for f in dataclasses.fields(body)}
                for section in dataclasses.fields(self) for body in [getattr(self, section.name)]}
