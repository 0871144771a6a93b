"""Bytes per GPU and per GPU's share of the host: model states per ZeRO stage and offload,
activations per recompute mode, token-wise recompute and activation offload, logits, overhead.

Activations follow Korthikanti et al. (arXiv 2205.05198), tensor by tensor, so that the same code
covers what their closed forms do not: GQA (smaller K/V), SwiGLU (three FFN tensors), no dropout
(no masks), flash attention (no score matrix), context parallelism (each rank holds s/cp tokens
but attends to all s). For a GELU 4h, MHA, dropout, eager-attention model it reduces to their
s·b·h·(34 + 5·a·s/h) (no parallelism), s·b·h·(10 + 24/t + 5·a·s/(h·t)) (TP),
s·b·h·(34/t + 5·a·s/(h·t)) (TP + SP), 34·s·b·h/t (+ selective recompute) and 2·s·b·h (full).

``train.kernels = "eager"`` counts what plait's own block saves, operator by operator (checked
against a saved-tensor count of plait's Llama in tests/unit/test_plan_memory.py): the residual
stream is fp32 (autocast leaves it so), each RMSNorm keeps its fp32 input, the normalized fp32
tensor and a per-row scale, GQA's K and V are expanded to every head before SDPA, and SwiGLU
keeps the SiLU output beside its two inputs and their product.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from plait.plan.compute import DTYPE_BYTES, tokens_per_gpu
from plait.plan.hardware import GIB, GpuSpec
from plait.layout import Layout, micro_batches_in_flight, schedule
from plait.plan.spec import PlanModel, PlanTrain

FP32 = 4


@dataclass(frozen=True)
class BlockActivations:
    """What one block saves for backward, one micro-batch on one GPU, bytes, split the way
    token-wise recompute (MEMO) splits the block: region A (attention norm, q/k/v projections,
    rotary), the attention core (q, k, v, output, log-sum-exp or scores: always kept) and region
    B (output projection, residual, MLP norm, MLP). ``block_input`` is the block's input x, what a
    recomputed token keeps of regions A and B (B's other input, the attention output, is the
    core's)."""

    region_a: float
    core: float
    region_b: float
    block_input: float
    scores: float  # the part of ``core`` selective (attention-core) recompute drops
    # What op recompute keeps besides the block input: the outputs of the matmuls and of the
    # attention kernel (plait/parallel/recompute.py's policy); everything between is rebuilt.
    matmul_outputs: float = 0.0

    def kept(self, recompute: str, fraction: float = 0.0) -> float:
        """Bytes kept to backward under ``recompute`` (none | selective | op | full), with ``fraction``
        of the tokens' per-token activations recomputed (recompute = none)."""
        if recompute == "full":
            return self.block_input
        if recompute == "op":
            return self.block_input + self.matmul_outputs
        core = self.core - (self.scores if recompute == "selective" else 0.0)
        per_token = self.region_a + self.region_b
        return core + (1 - fraction) * per_token + fraction * self.block_input

    def rebuilt(self, recompute: str, fraction: float = 0.0) -> float:
        """Bytes backward rebuilds for one block at a time: the whole block (full), the scores
        (selective), the recomputed tokens' regions A and B (token-wise)."""
        if recompute == "full":
            return self.core + self.region_a + self.region_b
        if recompute == "op":
            return max(0.0, self.core + self.region_a + self.region_b - self.matmul_outputs)
        if recompute == "selective":
            return self.scores
        return fraction * (self.region_a + self.region_b)


def stream_bytes(train: PlanTrain) -> int:
    """Bytes per element of the residual stream: fp32 in plait's eager blocks (autocast computes
    the sum in fp32), the compute dtype with fused kernels."""
    return FP32 if train.kernels == "eager" else DTYPE_BYTES[train.dtype]


def _norm_saved(train: PlanTrain, stream: float, rows: float) -> float:
    """Bytes one norm keeps besides its output: fused, its input; eager, its fp32 input, the
    fp32 normalized tensor (the weight multiply's operand) and the per-row scale."""
    if train.kernels == "eager":
        return 2 * FP32 * stream + FP32 * rows
    return DTYPE_BYTES[train.dtype] * stream


def block_activations(model: PlanModel, train: PlanTrain, layout: Layout) -> BlockActivations:
    """One block's saved tensors by region (see ``BlockActivations``)."""
    e, t = DTYPE_BYTES[train.dtype], layout.tp
    rows, h, kv = tokens_per_gpu(train, layout), model.dim, model.kv_dim
    stream = rows * h / (t if train.sequence_parallel else 1)  # residual-stream elements on this GPU
    mask = 1 if train.dropout else 0
    heads = model.n_heads / t
    scores = layout.micro_batch * heads * (train.seq_len / layout.cp) * train.seq_len
    score_bytes = scores * (e + (e + 1) * mask) if train.attention == "eager" else FP32 * rows * heads
    kv_saved = h if train.kernels == "eager" else kv  # eager SDPA gets K/V expanded to every head
    core = e * rows * (h + 2 * kv_saved) / t + e * rows * h / t + score_bytes
    region_a = _norm_saved(train, stream, rows) + e * stream  # + the projections' input
    if model.moe_experts:
        width = model.moe_top_k * model.expert_ffn_dim + model.moe_shared_ffn_dim
        dispatch = 2 * e * rows * model.moe_top_k * h  # tokens permuted to and back from their experts
    else:
        width, dispatch = model.ffn_dim, 0
    if model.mlp == "swiglu":  # gate, up, product; eager also the SiLU output
        ffn_tensors = 4 if train.kernels == "eager" else 3
    else:  # pre- and post-GELU
        ffn_tensors = 2
    mlp = e * stream + ffn_tensors * e * rows * width / t + dispatch + mask * stream
    region_b = mask * stream + _norm_saved(train, stream, rows) + mlp  # attention dropout mask, MLP norm
    # Op recompute keeps the q/k/v projections (before rotary and the K/V expansion), the
    # attention output with its log-sum-exp (or scores), the output projection, the MLP's input
    # projections and its down projection.
    attention_kept = e * rows * h / t + (score_bytes if train.attention == "eager" else FP32 * rows * heads)
    matmul_outputs = (e * rows * (h + 2 * kv) / t + attention_kept + e * stream
                      + (model.mlp_matrices - 1) * e * rows * width / t + e * stream + dispatch)
    return BlockActivations(region_a, core, region_b, stream_bytes(train) * stream, score_bytes, matmul_outputs)


def block_activation_bytes(model: PlanModel, train: PlanTrain, layout: Layout, recompute: str,
                           fraction: float = 0.0) -> float:
    """Bytes one block keeps from forward to backward for one micro-batch on one GPU."""
    return block_activations(model, train, layout).kept(recompute, fraction)


def head_activation_bytes(model: PlanModel, train: PlanTrain, layout: Layout, first: bool, last: bool) -> float:
    """Saved tensors outside the blocks, one micro-batch: the token ids (first stage), the final
    norm and the output layer's input (last stage), and eager rotary's cos/sin tables (fp32)."""
    e, rows = DTYPE_BYTES[train.dtype], tokens_per_gpu(train, layout)
    stream = rows * model.dim / (layout.tp if train.sequence_parallel else 1)
    saved = 8.0 * rows if first else 0.0
    if last:
        saved += _norm_saved(train, stream, rows) + e * rows * model.dim
    if train.kernels == "eager":
        saved += 2 * FP32 * rows * model.head_dim
    return saved


@dataclass(frozen=True)
class HostMemory:
    """Bytes of one GPU's share of its node's host memory, by category (offload)."""

    params: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


@dataclass(frozen=True)
class Memory:
    """Device bytes per GPU on its fullest pipeline stage, by category, and its host bytes."""

    params: float
    grads: float
    optimizer: float
    activations: float  # saved for backward at the end of forward (all micro-batches in flight)
    logits: float
    overhead: float  # runtime reservation + fragmentation allowance
    # Buffers that come and go: the block backward rebuilds (recompute), ZeRO-3's gathered and
    # prefetched weights, activation offload's blocks in transfer.
    transient: float = 0.0
    host: HostMemory = field(default_factory=HostMemory)

    @property
    def total(self) -> float:
        """Device bytes."""
        return self.params + self.grads + self.optimizer + self.activations + self.logits + self.overhead + \
            self.transient

    def gib(self) -> dict[str, float]:
        return {k: round(getattr(self, k) / GIB, 2) for k in
                ("params", "grads", "optimizer", "activations", "logits", "transient", "overhead")}

    def host_gib(self) -> dict[str, float]:
        return {f.name: round(getattr(self.host, f.name) / GIB, 2) for f in fields(HostMemory)}


def fits(memory: Memory, gpu: GpuSpec) -> bool:
    """Device bytes within the GPU's memory and host bytes within its share of the host's (one
    pool on a CPU)."""
    if gpu.unified_memory:
        return memory.total + memory.host.total <= gpu.memory_bytes
    return memory.total <= gpu.memory_bytes and memory.host.total <= gpu.host_memory_bytes


def stage_params(model: PlanModel, layout: Layout, first: bool, last: bool) -> tuple[float, float]:
    """(shared, expert) parameters one GPU of a stage holds before ZeRO sharding (elements)."""
    layers = -(-model.n_layers // layout.pp)  # the fullest stage
    shared = layers * model.shared_block_params() / layout.tp
    experts = layers * model.expert_params() / (layout.tp * layout.ep)
    if first:
        shared += model.embedding_params() / layout.tp
    if last and not (first and model.tie_embeddings):
        shared += model.embedding_params() / layout.tp
    if last:
        shared += model.dim  # the final norm, whole on every rank
    return shared, experts


def weight_and_state_bytes(dtype: str) -> tuple[int, int]:
    """(bytes per weight or gradient, bytes of optimizer state per parameter): mixed precision
    keeps 2-byte weights and gradients and 12 bytes of fp32 master weight and Adam moments; fp32
    keeps 4 + 8."""
    return (4, 8) if dtype == "fp32" else (2, 12)


def model_state_bytes(shared: float, experts: float, layout: Layout, dtype: str) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes after ZeRO sharding (see ``weight_and_state_bytes``).
    Stage 1 shards the optimizer, 2 also gradients, 3 also weights, over the ranks holding the
    same weights: dp x cp (experts: dp x cp / ep)."""
    weight_b, opt_b = weight_and_state_bytes(dtype)
    shard_shared = layout.dp * layout.cp
    shard_expert = max(1, shard_shared // layout.ep)
    z = layout.zero

    def split(count: float, ranks: int, stage: int) -> float:
        return count / ranks if z >= stage else count

    params = weight_b * (split(shared, shard_shared, 3) + split(experts, shard_expert, 3))
    grads = weight_b * (split(shared, shard_shared, 2) + split(experts, shard_expert, 2))
    optimizer = opt_b * (split(shared, shard_shared, 1) + split(experts, shard_expert, 1))
    return params, grads, optimizer


def offloaded_blocks(layout: Layout, n_layers: int, first: bool) -> int:
    """Blocks of the first (or last) pipeline rank whose activations go to the host: those among
    the model's first ``activation_offload`` layers (-1: all). Rank r holds stage chunks r, pp + r,
    ... (looped schedules) or r and 2pp - 1 - r (V-shaped ones), each n_layers / (pp x vpp) long."""
    count = n_layers if layout.activation_offload == -1 else layout.activation_offload
    rank = 0 if first else layout.pp - 1
    chunks = layout.pp * layout.vpp
    if layout.pp > 1 and schedule(layout.schedule).v_shaped:
        stages = [rank, 2 * layout.pp - 1 - rank]
    else:
        stages = [j * layout.pp + rank for j in range(layout.vpp)]
    size = n_layers // chunks
    return sum(max(0, min(size, count - s * size)) for s in stages)


# Units FSDP gathers ahead of the one computing (FSDP2's implicit prefetch: the next block's
# all-gather is issued while the current block runs). Deeper prefetch would not hide more in the
# steady state, where the link is busy throughout; it would only hold more gathered blocks.
ZERO3_PREFETCH = 1

# Gradient buckets in flight when ZeRO-0/1/2 reduce gradients while backward runs: PyTorch DDP's
# default bucket (bucket_cap_mb = 25), one being filled and one being reduced.
BUCKET_BYTES = 25 * 2**20
BUCKETS_IN_FLIGHT = 2


def bucket_bytes(layout: Layout) -> float:
    """Device bytes of the gradient buckets of bucketed data-parallel reduction (ZeRO-0/1/2)."""
    return BUCKETS_IN_FLIGHT * BUCKET_BYTES if layout.zero <= 2 and layout.dp * layout.cp > 1 else 0.0


def gathered_bytes(model: PlanModel, train: PlanTrain, layout: Layout, shared: float, block: float) -> float:
    """ZeRO-3's unsharded buffers at the step's peak (the start of backward): the block computing
    and the one prefetched (ZERO3_PREFETCH ahead), the root's weights (embedding and output layer,
    gathered for the loss), and the unsharded gradients of the output layer and of one block
    waiting for their reduce-scatter, in ``train.reduce_dtype``."""
    e, layers = DTYPE_BYTES[train.dtype], -(-model.n_layers // layout.pp)
    reduce_b = FP32 if train.reduce_dtype == "fp32" or train.dtype == "fp32" else e
    root = shared - layers * model.shared_block_params() / layout.tp  # elements
    return (1 + ZERO3_PREFETCH) * block + e * root + reduce_b * (root + block / e)


def model_states(model: PlanModel, train: PlanTrain, layout: Layout, first: bool,
                 last: bool) -> tuple[float, float, float, HostMemory, float]:
    """(device params, grads, optimizer, host model states, gathered weights in flight) of a stage.

    offload = optimizer: the optimizer state lives on the host, and during the step a host copy of
    each parameter and gradient it updates; offload = params (FSDP2 CPU offload): sharded weights, gradients and
    optimizer state live there, and the device holds only the units gathered for compute (two
    blocks and the root under ZeRO-3; every block under ZeRO-2, which keeps them to backward) and
    the gradients of the two units being reduce-scattered."""
    e, layers = DTYPE_BYTES[train.dtype], -(-model.n_layers // layout.pp)
    weight_b, _ = weight_and_state_bytes(train.dtype)
    shared, experts = stage_params(model, layout, first, last)
    params, grads, optimizer = model_state_bytes(shared, experts, layout, train.dtype)
    block = e * (model.shared_block_params() / layout.tp + model.expert_params() / (layout.tp * layout.ep))
    gathered = gathered_bytes(model, train, layout, shared, block) if layout.zero == 3 else 0.0
    gathered += bucket_bytes(layout)
    if layout.offload == "optimizer":
        # The host step reads a copy of each parameter and gradient this rank updates (its
        # shard under ZeRO-1), beside the optimizer state: no persistent master is kept.
        owned = 1 / (layout.dp * layout.cp) if layout.zero == 1 else 1.0
        return params, grads, 0.0, HostMemory(params * owned, grads * owned, optimizer), gathered
    if layout.offload == "params":
        host = model_state_bytes(shared, experts, replace(layout, zero=3), train.dtype)
        root = e * (shared - layers * model.shared_block_params() / layout.tp)  # embedding, output layer
        units = 2 if layout.zero == 3 else layers
        device_params = min(units, layers) * block + root
        device_grads = min(2, layers) * weight_b / e * block
        return device_params, device_grads, 0.0, HostMemory(*host), 0.0
    return params, grads, optimizer, HostMemory(), gathered


def memory_per_gpu(model: PlanModel, train: PlanTrain, layout: Layout, gpu: GpuSpec) -> Memory:
    """Peak bytes on the fullest GPU: the first stage (embedding, most micro-batches in flight)
    or the last (output layer and logits), whichever holds more on the device."""
    e = DTYPE_BYTES[train.dtype]
    m = layout.micro_batches(train.global_batch)
    in_flight = micro_batches_in_flight(layout.schedule, layout.pp, layout.vpp, m)
    layers = -(-model.n_layers // layout.pp)
    parts = block_activations(model, train, layout)
    fraction = layout.recompute_fraction if layout.recompute == "none" else 0.0
    block = parts.kept(layout.recompute, fraction)
    # Backward rebuilds one block's recomputed activations at a time.
    working = parts.rebuilt(layout.recompute, fraction) if layout.recompute != "none" or fraction else 0.0
    logits = tokens_per_gpu(train, layout) * model.vocab_size / layout.tp * (e + 4)
    best: Memory | None = None
    for first, last in ((True, layout.pp == 1), (False, True)):
        params, grads, optimizer, host, gathered = model_states(model, train, layout, first, last)
        flight = in_flight if first else 1.0
        offloaded = offloaded_blocks(layout, model.n_layers, first) if layout.activation_offload else 0
        # Offloaded blocks go to the host; the one in transfer and the one prefetched stay.
        activations = (layers - offloaded) * block * flight + head_activation_bytes(model, train, layout, first, last) * flight
        host = HostMemory(host.params, host.grads, host.optimizer, offloaded * block * flight)
        transient = working + gathered + min(2, offloaded) * block
        stage_logits = logits if last else 0.0
        overhead = gpu.reserved_bytes + gpu.fragmentation * (activations + stage_logits + transient)
        candidate = Memory(params, grads, optimizer, activations, stage_logits, overhead, transient, host)
        if best is None or candidate.total > best.total:
            best = candidate
    assert best is not None
    return best
