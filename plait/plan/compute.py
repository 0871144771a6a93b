"""Compute time: FLOPs of every matmul, how fast a GEMM of that shape runs, and the element-wise
kernels (norms, activations, softmax, residuals) that run at memory speed.

Times are per GPU, per micro-batch, for one transformer block (``block_cost``) or the output
layer with its loss (``head_cost``). A GEMM of shape (m, n, k) does 2mnk FLOPs at
``peak x gemm_efficiency x d / (d + gemm_half_dim)`` with d its smallest dimension: small
per-GPU matrices (high TP, short micro-batches, head_dim-sized attention) fill fewer tiles and run
below peak. It never runs faster than reading its operands from memory (the roofline).

Every operator also costs host time to issue (``GpuSpec.op_overhead_s``, and ``dtensor_op_s``
more on tensor-parallel DTensors when run eagerly; a compiled graph traces through DTensor). A GPU's host runs ahead of the device, so a block takes the
longer of the two; a CPU rank does both on one thread, so they add.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.plan.hardware import GpuSpec
from plait.layout import Layout
from plait.plan.spec import PlanModel, PlanTrain

DTYPE_BYTES = {"bf16": 2, "fp8": 2, "fp32": 4}  # fp8 GEMMs still keep bf16 activations between kernels

# Operators per transformer block, (forward, backward), counted on plait's Llama block with a
# dispatch mode (tests/unit/test_plan_ops.py keeps the eager count true): eager runs every norm,
# rotary embedding and activation as several operators; fused kernels (torch.compile, Megatron's
# fused norm and activation) issue about one per matmul, norm, activation and residual.
OPS_PER_BLOCK = {"eager": (72, 133), "fused": (16, 32)}
# Operators of the output layer and loss (and the embedding) per micro-batch, (forward, backward).
OPS_PER_HEAD = {"eager": (29, 34), "fused": (6, 10)}
# DTensor operators under plait's tensor-parallel plan (profiled on a one-rank mesh, the same
# test): per block and micro-batch (forward + backward), per micro-batch for the embedding,
# output layer and vocabulary-parallel loss, and per parameter tensor for clipping and AdamW.
DTENSOR_OPS_PER_BLOCK = 140
DTENSOR_OPS_PER_HEAD = 60
DTENSOR_OPS_PER_PARAM = 10
PARAM_TENSORS_PER_BLOCK = 9  # two norms, four attention and three MLP weights
# Operators of a block's forward whose outputs op recompute keeps (plait/parallel/recompute.py):
# the q, k, v, output, gate, up and down projections and the attention kernel.
SAVED_OPS_PER_BLOCK = 8
# Bytes each parameter moves through memory in the optimizer step: a fused AdamW reads and
# writes weights and both moments, reads the gradient and writes the compute copy (~28); the
# multi-tensor (foreach) AdamW plait runs on CPUs makes a pass per operation (weight decay,
# two moment updates, square root, bias corrections, the update: ~80), and gradient clipping
# reads every gradient and rescales it (12).
OPTIMIZER_BYTES = {"fused": 28.0, "eager": 92.0}


def gemm_efficiency(gpu: GpuSpec, m: float, n: float, k: float) -> float:
    """Fraction of peak FLOP/s a GEMM with these dimensions reaches (0..1)."""
    smallest = min(m, n, k)
    return gpu.gemm_efficiency * smallest / (smallest + gpu.gemm_half_dim)


def gemm_seconds(gpu: GpuSpec, dtype: str, m: float, n: float, k: float, count: float = 1.0) -> float:
    """Seconds for ``count`` GEMMs of (m x k) @ (k x n): compute-bound or operand-bound, whichever is slower."""
    if min(m, n, k) <= 0:
        return 0.0
    compute = 2.0 * m * n * k / (gpu.peak_flops(dtype) * gemm_efficiency(gpu, m, n, k))
    operands = DTYPE_BYTES[dtype] * (m * k + k * n + m * n) / (gpu.hbm_bytes_per_s * gpu.hbm_efficiency)
    return count * max(compute, operands)


def memory_seconds(gpu: GpuSpec, nbytes: float) -> float:
    """Seconds an element-wise kernel needs to move ``nbytes`` through HBM."""
    return nbytes / (gpu.hbm_bytes_per_s * gpu.hbm_efficiency)


@dataclass(frozen=True)
class BlockCost:
    """One block, one micro-batch, one GPU, seconds. ``attention_core_s`` is the part selective
    recompute repeats (scores, softmax, weighted sum); ``between_matmuls_s`` what op recompute
    repeats: the forward's element-wise kernels (norms, rotary, activation, residuals) and the
    host time of issuing them."""

    forward_s: float
    backward_s: float
    attention_core_s: float
    between_matmuls_s: float = 0.0

    def with_recompute(self, recompute: str, fraction: float = 0.0) -> float:
        """Forward + backward + what ``recompute`` runs again in backward, priced by the operations
        it repeats: the attention core (selective), the element-wise operators between the
        matmuls (op), the whole forward (full). Token-wise recompute (``fraction`` of the tokens,
        recompute = none) reruns that share of the block's forward outside the attention core."""
        extra = {"none": 0.0, "selective": self.attention_core_s, "op": self.between_matmuls_s,
                 "full": self.forward_s}[recompute]
        if recompute == "none":
            extra += fraction * (self.forward_s - self.attention_core_s)
        return self.forward_s + self.backward_s + extra


def tokens_per_gpu(train: PlanTrain, layout: Layout) -> int:
    """Tokens of one micro-batch on one context-parallel rank."""
    return layout.micro_batch * train.seq_len // layout.cp


def block_cost(model: PlanModel, train: PlanTrain, layout: Layout, gpu: GpuSpec) -> BlockCost:
    """Time of one transformer block for one micro-batch on one GPU (see module docstring)."""
    t, dt, e = layout.tp, train.dtype, DTYPE_BYTES[train.dtype]
    h, kv, rows = model.dim, model.kv_dim, tokens_per_gpu(train, layout)
    gemms = gemm_seconds(gpu, dt, rows, (h + 2 * kv) / t, h) + gemm_seconds(gpu, dt, rows, h, h / t)
    if model.moe_experts:
        local_experts = model.moe_experts / layout.ep
        expert_rows = rows * model.moe_top_k / local_experts  # tokens each local expert sees, balanced
        f = model.expert_ffn_dim
        gemms += gemm_seconds(gpu, dt, rows, model.moe_experts, h)  # router
        gemms += gemm_seconds(gpu, dt, expert_rows, (model.mlp_matrices - 1) * f / t, h, local_experts)
        gemms += gemm_seconds(gpu, dt, expert_rows, h, f / t, local_experts)
        mlp_width = model.moe_top_k * f + model.moe_shared_ffn_dim
        if model.moe_shared_ffn_dim:
            fs = model.moe_shared_ffn_dim
            gemms += gemm_seconds(gpu, dt, rows, (model.mlp_matrices - 1) * fs / t, h)
            gemms += gemm_seconds(gpu, dt, rows, h, fs / t)
    else:
        f = model.ffn_dim
        gemms += gemm_seconds(gpu, dt, rows, (model.mlp_matrices - 1) * f / t, h)
        gemms += gemm_seconds(gpu, dt, rows, h, f / t)
        mlp_width = f

    # Attention core: per (sequence, head) a (s/cp x s) @ (s x head_dim) pair; causal flash
    # kernels skip the masked half, eager attention computes the whole score matrix.
    heads = model.n_heads / t
    sequences = layout.micro_batch
    q_len, k_len, hd = train.seq_len / layout.cp, train.seq_len, model.head_dim
    causal_share = 0.5 if train.attention == "flash" else 1.0
    core = 2 * gemm_seconds(gpu, dt, q_len, k_len * causal_share, hd, sequences * heads)
    if train.attention == "flash":
        core /= gpu.attention_efficiency
    scores = sequences * heads * q_len * k_len  # elements of the score matrix on this GPU
    if train.attention == "eager":
        # Scores written and read by softmax, probabilities written and read by the second GEMM.
        core += memory_seconds(gpu, scores * (4 * e + (3 * e + 1 if train.dropout else 0)))

    elementwise = _elementwise_bytes(model, train, layout, rows, mlp_width)
    forward = gemms + core + memory_seconds(gpu, elementwise)
    # Backward: two GEMMs (input and weight gradients) per forward GEMM; flash attention's backward
    # recomputes the scores, 2.5x its forward; element-wise kernels read more than they write, ~2x.
    core_backward = core * (2.5 if train.attention == "flash" else 2.0)
    backward = 2 * gemms + core_backward + 2 * memory_seconds(gpu, elementwise)
    ops_fwd, ops_bwd = OPS_PER_BLOCK[train.kernels]
    host_fwd, host_bwd = ops_fwd * gpu.op_overhead_s, ops_bwd * gpu.op_overhead_s
    # Op recompute reruns the operators between the saved matmuls and attention kernel.
    between_ops = ops_fwd - SAVED_OPS_PER_BLOCK
    between = with_host(gpu, memory_seconds(gpu, elementwise), between_ops * gpu.op_overhead_s)
    if t > 1 and train.kernels == "eager":  # a third of the DTensor work in forward, the rest in backward, like the operators
        host_fwd += DTENSOR_OPS_PER_BLOCK / 3 * gpu.dtensor_op_s
        host_bwd += DTENSOR_OPS_PER_BLOCK * 2 / 3 * gpu.dtensor_op_s
    return BlockCost(with_host(gpu, forward, host_fwd), with_host(gpu, backward, host_bwd), core, between)


def with_host(gpu: GpuSpec, device_s: float, host_s: float) -> float:
    """Time of work that takes ``device_s`` on the device and ``host_s`` to issue."""
    return max(device_s, host_s) if gpu.host_async else device_s + host_s


def _elementwise_bytes(model: PlanModel, train: PlanTrain, layout: Layout, rows: int, mlp_width: float) -> float:
    """Bytes the element-wise work of one block's forward moves on one GPU.

    Fused: each norm reads and writes the stream once, each residual add reads two and writes
    one, rotary reads and writes q and k, the activation reads its inputs and writes its output.
    Eager (plait's block op by op, counted on its code): a norm is a square, a mean, a scale and
    the weight multiply (7 passes); rotary is two multiplies, a negation, a concatenation and an
    add (10 passes of q and of k); the attention output is copied once to merge heads (2); the
    SwiGLU activation is SiLU then a multiply (5 passes of the hidden width, GELU 2).
    Dropout adds a read, a write and a 1-byte mask per use. Without sequence parallelism every
    TP rank repeats the norms and residuals on the whole stream.
    """
    t, e, h, kv = layout.tp, DTYPE_BYTES[train.dtype], model.dim, model.kv_dim
    stream = rows * h / (t if train.sequence_parallel else 1)
    gated = model.mlp == "swiglu"
    if train.kernels == "eager":
        per_stream, rotary, merge, activation = 2 * 7 + 2 * 3, 10, 2 * rows * h / t, 5 if gated else 2
    else:
        per_stream, rotary, merge, activation = 2 * 2 + 2 * 3, 2, 0.0, 3 if gated else 2
    elements = stream * per_stream + rows * rotary * (h + kv) / t + merge + rows * mlp_width / t * activation
    dropout = stream * 2 * (2 * e + 1) if train.dropout else 0.0
    return elements * e + dropout


def head_cost(model: PlanModel, train: PlanTrain, layout: Layout, gpu: GpuSpec) -> float:
    """Output layer + cross-entropy, forward and backward, one micro-batch on one GPU, seconds
    (vocabulary split over TP ranks)."""
    rows, vocab, e = tokens_per_gpu(train, layout), model.vocab_size / layout.tp, DTYPE_BYTES[train.dtype]
    gemm = gemm_seconds(gpu, train.dtype, rows, vocab, model.dim)
    # Fused: logits written in the compute dtype, softmax in fp32 (read, write), gradient written
    # back. Eager: log-softmax, the loss gather and their backward each pass over the logits.
    per_logit = 4 * e + 16 if train.kernels == "eager" else 2 * e + 8
    loss = memory_seconds(gpu, rows * vocab * per_logit)
    ops = sum(OPS_PER_HEAD[train.kernels]) * gpu.op_overhead_s
    if layout.tp > 1 and train.kernels == "eager":
        ops += DTENSOR_OPS_PER_HEAD * gpu.dtensor_op_s
    return with_host(gpu, 3 * gemm + loss, ops)


def optimizer_seconds(params: float, gpu: GpuSpec, train: PlanTrain | None = None, tensors: int = 0,
                      tp: int = 1) -> float:
    """AdamW step (and gradient clipping) over ``params`` local parameters in ``tensors``
    parameter tensors: memory-bound at OPTIMIZER_BYTES per parameter, plus the DTensor operators
    per tensor under eager tensor parallelism."""
    train = train or PlanTrain()
    host = DTENSOR_OPS_PER_PARAM * tensors * gpu.dtensor_op_s if tp > 1 and train.kernels == "eager" else 0.0
    return with_host(gpu, memory_seconds(gpu, OPTIMIZER_BYTES[train.kernels] * params), host)


def model_flops_per_step(model: PlanModel, train: PlanTrain) -> float:
    """Model FLOPs of one optimizer step, no recompute: 6 per weight multiply-add per token for
    every block matrix (the routed top-k experts only) and the output layer, plus 12·layers·seq·dim
    per token for attention over the full (unmasked) score matrix. For a GELU 4h model this equals
    72·B·s·l·h²·(1 + s/(6h) + V/(12·l·h))."""
    if model.moe_experts:
        mlp = model.mlp_matrices * model.dim * (model.moe_top_k * model.expert_ffn_dim + model.moe_shared_ffn_dim)
        mlp += model.dim * model.moe_experts
    else:
        mlp = model.dense_mlp_params()
    per_token = 6.0 * (model.n_layers * (model.attention_params() + mlp) + model.embedding_params())
    per_token += 12.0 * model.n_layers * train.seq_len * model.dim
    return per_token * train.seq_len * train.global_batch
