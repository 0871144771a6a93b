"""Compute time: FLOPs of every matmul, how fast a GEMM of that shape runs, and the element-wise
kernels (norms, activations, softmax, residuals) that run at memory speed.

Times are per GPU, per micro-batch, for one transformer block (``block_cost``) or the output
layer with its loss (``head_cost``). A GEMM of shape (m, n, k) does 2mnk FLOPs at
``peak x gemm_efficiency x d / (d + gemm_half_dim)`` with d its smallest dimension: small
per-GPU matrices (high TP, short micro-batches, head_dim-sized attention) fill fewer tiles and run
below peak. It never runs faster than reading its operands from memory (the roofline).
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.plan.hardware import GpuSpec
from plait.plan.layout import Layout
from plait.plan.spec import PlanModel, PlanTrain

DTYPE_BYTES = {"bf16": 2, "fp8": 2, "fp32": 4}  # fp8 GEMMs still keep bf16 activations between kernels


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
    recompute repeats (scores, softmax, weighted sum)."""

    forward_s: float
    backward_s: float
    attention_core_s: float

    def with_recompute(self, recompute: str) -> float:
        """Forward + backward + what ``recompute`` runs again in backward."""
        extra = {"none": 0.0, "selective": self.attention_core_s, "full": self.forward_s}[recompute]
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
    scores = sequences * heads * q_len * k_len  # elements of the score matrix on this GPU
    if train.attention == "eager":
        # Scores written and read by softmax, probabilities written and read by the second GEMM.
        core += memory_seconds(gpu, scores * (4 * e + (3 * e + 1 if train.dropout else 0)))

    # Element-wise kernels on the residual stream: two norms (read, write), two residual adds
    # (two reads, one write), dropout (read, write, 1-byte mask). Without sequence parallelism
    # every TP rank repeats them on the whole stream.
    stream = rows * h / (t if train.sequence_parallel else 1)
    per_element = 2 * 2 * e + 2 * 3 * e + (2 * (2 * e + 1) if train.dropout else 0)
    elementwise = stream * per_element
    elementwise += rows * 2 * (h + kv) / t * e  # rotary embedding of q and k (read, write)
    elementwise += rows * mlp_width / t * e * (3 if model.mlp == "swiglu" else 2)  # activation function
    forward = gemms + core + memory_seconds(gpu, elementwise)
    # Backward: two GEMMs (input and weight gradients) per forward GEMM; flash attention's backward
    # recomputes the scores, 2.5x its forward; element-wise kernels read more than they write, ~2x.
    core_backward = core * (2.5 if train.attention == "flash" else 2.0)
    backward = 2 * gemms + core_backward + 2 * memory_seconds(gpu, elementwise)
    return BlockCost(forward, backward, core)


def head_cost(model: PlanModel, train: PlanTrain, layout: Layout, gpu: GpuSpec) -> float:
    """Output layer + cross-entropy, forward and backward, one micro-batch on one GPU, seconds
    (vocabulary split over TP ranks)."""
    rows, vocab = tokens_per_gpu(train, layout), model.vocab_size / layout.tp
    gemm = gemm_seconds(gpu, train.dtype, rows, vocab, model.dim)
    # Logits written in the compute dtype, softmax in fp32 (read, write), gradient written back.
    loss = memory_seconds(gpu, rows * vocab * (2 * DTYPE_BYTES[train.dtype] + 8))
    return 3 * gemm + loss


def optimizer_seconds(params: float, gpu: GpuSpec) -> float:
    """AdamW step over ``params`` local parameters: read/write fp32 weights and two moments,
    read the gradient, write the compute copy: about 28 bytes each, memory-bound."""
    return memory_seconds(gpu, 28.0 * params)


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
