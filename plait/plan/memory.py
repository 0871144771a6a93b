"""Bytes per GPU: model states per ZeRO stage, activations per recompute mode, logits, overhead.

Activations follow Korthikanti et al. (arXiv 2205.05198), tensor by tensor, so that the same code
covers what their closed forms do not: GQA (smaller K/V), SwiGLU (three FFN tensors), no dropout
(no masks), flash attention (no score matrix), context parallelism (each rank holds s/cp tokens
but attends to all s). For a GELU 4h, MHA, dropout, eager-attention model it reduces to their
s·b·h·(34 + 5·a·s/h) (no parallelism), s·b·h·(10 + 24/t + 5·a·s/(h·t)) (TP),
s·b·h·(34/t + 5·a·s/(h·t)) (TP + SP), 34·s·b·h/t (+ selective recompute) and 2·s·b·h (full).
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.plan.compute import DTYPE_BYTES, tokens_per_gpu
from plait.plan.hardware import GIB, GpuSpec
from plait.layout import Layout
from plait.layout import micro_batches_in_flight
from plait.plan.spec import PlanModel, PlanTrain

# Allocator fragmentation: caching allocators keep freed blocks of the wrong size around; about
# a tenth of the tensors that come and go each step (activations, gathered weights, logits).
FRAGMENTATION = 0.10


def block_activation_bytes(model: PlanModel, train: PlanTrain, layout: Layout, recompute: str) -> float:
    """Bytes one block keeps from forward to backward for one micro-batch on one GPU."""
    e, t = DTYPE_BYTES[train.dtype], layout.tp
    rows, h, kv = tokens_per_gpu(train, layout), model.dim, model.kv_dim
    stream_split = t if train.sequence_parallel else 1
    stream = rows * h / stream_split  # residual-stream elements on this GPU
    if recompute == "full":
        return e * stream  # only the block's input
    mask = 1 if train.dropout else 0
    heads = model.n_heads / t
    scores = layout.micro_batch * heads * (train.seq_len / layout.cp) * train.seq_len
    norms = 2 * e * stream  # inputs of the two norms
    attention = e * stream + e * rows * (h + 2 * kv) / t + e * rows * h / t + mask * stream
    if recompute == "none":
        attention += scores * (e + (e + 1) * mask) if train.attention == "eager" else 4 * rows * heads
    if model.moe_experts:
        width = model.moe_top_k * model.expert_ffn_dim + model.moe_shared_ffn_dim
        dispatch = 2 * e * rows * model.moe_top_k * h  # tokens permuted to and back from their experts
    else:
        width, dispatch = model.ffn_dim, 0
    ffn_tensors = 3 if model.mlp == "swiglu" else 2  # gate, up, product | pre- and post-GELU
    mlp = e * stream + ffn_tensors * e * rows * width / t + dispatch + mask * stream
    return norms + attention + mlp


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU on its fullest pipeline stage, by category."""

    params: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    overhead: float  # runtime reservation + fragmentation allowance

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.logits + self.overhead

    def gib(self) -> dict[str, float]:
        return {k: round(getattr(self, k) / GIB, 2) for k in
                ("params", "grads", "optimizer", "activations", "logits", "overhead")}


def stage_params(model: PlanModel, layout: Layout, first: bool, last: bool) -> tuple[float, float]:
    """(shared, expert) parameters one GPU of a stage holds before ZeRO sharding (elements)."""
    layers = -(-model.n_layers // layout.pp)  # the fullest stage
    shared = layers * model.shared_block_params() / layout.tp
    experts = layers * model.expert_params() / (layout.tp * layout.ep)
    if first:
        shared += model.embedding_params() / layout.tp
    if last and not (first and model.tie_embeddings):
        shared += model.embedding_params() / layout.tp
    return shared, experts


def model_state_bytes(shared: float, experts: float, layout: Layout, dtype: str) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes after ZeRO sharding. Mixed precision (bf16/fp8) keeps
    2-byte weights and gradients and 12 bytes of fp32 master weight and Adam moments; fp32 keeps
    4 + 4 + 8. Stage 1 shards the optimizer, 2 also gradients, 3 also weights, over the ranks
    holding the same weights: dp x cp (experts: dp x cp / ep)."""
    weight_b, opt_b = (4, 8) if dtype == "fp32" else (2, 12)
    shard_shared = layout.dp * layout.cp
    shard_expert = max(1, shard_shared // layout.ep)
    z = layout.zero

    def split(count: float, ranks: int, stage: int) -> float:
        return count / ranks if z >= stage else count

    params = weight_b * (split(shared, shard_shared, 3) + split(experts, shard_expert, 3))
    grads = weight_b * (split(shared, shard_shared, 2) + split(experts, shard_expert, 2))
    optimizer = opt_b * (split(shared, shard_shared, 1) + split(experts, shard_expert, 1))
    return params, grads, optimizer


def memory_per_gpu(model: PlanModel, train: PlanTrain, layout: Layout, gpu: GpuSpec) -> Memory:
    """Peak bytes on the fullest GPU: the first stage (embedding, most micro-batches in flight)
    or the last (output layer and logits), whichever is larger."""
    e = DTYPE_BYTES[train.dtype]
    m = layout.micro_batches(train.global_batch)
    in_flight = micro_batches_in_flight(layout.schedule, layout.pp, layout.vpp, m)
    layers = -(-model.n_layers // layout.pp)
    kept = block_activation_bytes(model, train, layout, layout.recompute) * layers
    # Backward of a recomputed block rebuilds its full activations once, for one block at a time.
    working = 0.0 if layout.recompute == "none" else block_activation_bytes(model, train, layout, "none")
    logits = tokens_per_gpu(train, layout) * model.vocab_size / layout.tp * (e + 4)
    gathered = 0.0
    if layout.zero == 3:  # one block's weights gathered at a time, plus the next one prefetched
        gathered = 2 * e * model.shared_block_params() / layout.tp
    best: Memory | None = None
    for first, last in ((True, layout.pp == 1), (False, True)):
        shared, experts = stage_params(model, layout, first, last)
        params, grads, optimizer = model_state_bytes(shared, experts, layout, train.dtype)
        flight = in_flight if first else 1.0
        activations = kept * flight + working
        stage_logits = logits if last else 0.0
        overhead = gpu.reserved_bytes + FRAGMENTATION * (activations + stage_logits + gathered) + gathered
        candidate = Memory(params, grads, optimizer, activations, stage_logits, overhead)
        if best is None or candidate.total > best.total:
            best = candidate
    assert best is not None
    return best
