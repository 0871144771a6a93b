"""One layout's step: compute, exposed communication by dimension, bubble, optimizer, memory.

The step on the critical path (the first pipeline stage, which waits longest) is

    m x (F + B) + bubble(F, B) + pipeline sends + exposed data-parallel traffic + optimizer

where F and B are one micro-batch's forward and backward (with recompute) through the rank's
layers, including the tensor-, context- and expert-parallel communication that cannot overlap
(it sits between dependent kernels). Data-parallel traffic overlaps backward when the framework
buckets it (``train.overlap_grad_reduce``); ring attention's K/V passing overlaps the attention
it feeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from plait.plan import comm
from plait.plan.flops import (
    DTYPE_BYTES, PARAM_TENSORS_PER_BLOCK, block_cost, head_cost, model_flops_per_step, optimizer_seconds, tokens_per_gpu,
)
from plait.plan.hardware import Cluster
from plait.plan.layout import Layout
from plait.plan.memory import Memory, memory_per_gpu, stage_params
from plait.plan.schedule import bubble_seconds
from plait.plan.spec import PlanModel, PlanTrain


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    step_time_s: float
    compute_s: float
    bubble_s: float
    optimizer_s: float
    exposed_comm_s: dict[str, float]
    memory: Memory
    fits: bool
    tokens_per_s_per_gpu: float
    model_tflops_per_gpu: float
    mfu: float
    notes: list[str] = field(default_factory=list)

    def breakdown(self) -> dict:
        return {
            "compute_s": round(self.compute_s, 6),
            "bubble_s": round(self.bubble_s, 6),
            "optimizer_s": round(self.optimizer_s, 6),
            "exposed_comm_s": {k: round(v, 6) for k, v in self.exposed_comm_s.items()},
            "memory_gib": self.memory.gib(),
        }


@dataclass(frozen=True)
class Placement:
    """Strides of each group in rank order: tp innermost, then cp, then dp, pp outermost."""

    tp: int = 1
    cp: int = 1
    dp: int = 1
    pp: int = 1


def placement(layout: Layout) -> Placement:
    return Placement(tp=1, cp=layout.tp, dp=layout.tp * layout.cp, pp=layout.tp * layout.cp * layout.dp)


def _per_block_comm(model: PlanModel, train: PlanTrain, layout: Layout, cluster: Cluster, core_s: float) -> dict[str, float]:
    """Exposed TP, CP and EP seconds of one block's forward (backward costs the same again)."""
    e, strides = DTYPE_BYTES[train.dtype], placement(layout)
    rows = tokens_per_gpu(train, layout)
    activation = e * rows * model.dim  # one micro-batch's residual stream on this cp rank
    # TP: two all-reduces per block (after attention, after the MLP); with sequence parallelism
    # each is an all-gather plus a reduce-scatter, the same bytes.
    tp = 2 * comm.all_reduce(cluster, layout.tp, strides.tp, activation)
    cp = 0.0
    if layout.cp > 1:
        if train.cp_mode == "ring":
            kv_block = e * rows * 2 * model.kv_dim / layout.tp
            step = comm.point_to_point(cluster, layout.cp, strides.cp, kv_block)
            hidden = core_s if cluster.gpu.core_share >= 1.0 else 0.0  # see _exposed_dp
            cp = max(0.0, (layout.cp - 1) * step - hidden)  # hidden behind the block being computed
        else:
            qkvo = e * rows * (2 * model.dim + 2 * model.kv_dim) / layout.tp
            cp = comm.all_to_all(cluster, layout.cp, strides.cp, qkvo)
    ep = 0.0
    if model.moe_experts and layout.ep > 1:
        routed = e * rows * model.moe_top_k * model.dim
        ep = 2 * comm.all_to_all(cluster, layout.ep, strides.dp, routed)  # dispatch and combine
    return {"tp": tp, "cp": cp, "ep": ep}


def estimate(model: PlanModel, train: PlanTrain, cluster: Cluster, layout: Layout) -> Estimate:
    """Predicted step time (seconds), memory per GPU and their breakdown for ``layout``."""
    gpu, strides = cluster.gpu, placement(layout)
    m = layout.micro_batches(train.global_batch)
    layers = -(-model.n_layers // layout.pp)
    block = block_cost(model, train, layout, gpu)
    block_comm = _per_block_comm(model, train, layout, cluster, block.attention_core_s)
    # Forward once, backward once, and once more when full recompute reruns the forward.
    passes = 3 if layout.recompute == "full" else 2
    comm_fwd = layers * sum(block_comm.values())

    # The output layer and loss sit on the last stage (with one stage, on the only one); that
    # stage paces the pipeline. The embedding lookup costs no FLOPs worth counting.
    head = head_cost(model, train, layout, gpu)
    compute_fwd = layers * block.forward_s + head / 3
    compute_bwd = layers * (block.with_recompute(layout.recompute) - block.forward_s) + 2 * head / 3
    fwd = compute_fwd + comm_fwd
    bwd = compute_bwd + comm_fwd * (passes - 1)
    bubble = bubble_seconds(layout.schedule, layout.pp, layout.vpp, fwd, bwd)
    compute = m * (compute_fwd + compute_bwd)
    if gpu.core_share < 1.0:
        # Ranks share cores (CPU): a rank idling in the bubble hands its core to a busy one. The
        # step is then bounded by the whole machine's work (compute at the contended rate, no
        # bubble) and by the critical path at the uncontended rate (core_share of the time).
        bubble = max(0.0, (compute + bubble) * gpu.core_share - compute)

    exposed = {k: m * layers * v * passes for k, v in block_comm.items()}
    e = DTYPE_BYTES[train.dtype]
    exposed["pp"] = 0.0
    if layout.pp > 1:
        boundary = e * tokens_per_gpu(train, layout) * model.dim / layout.tp
        send = comm.point_to_point(cluster, layout.pp, strides.pp, boundary)
        # Each micro-batch enters and leaves each of the rank's v chunks forward and backward;
        # the fill and drain add a send per stage.
        exposed["pp"] = send * (2 * layout.vpp * m + 2 * (layout.pp - 1))

    shared, experts = stage_params(model, layout, first=True, last=layout.pp == 1)
    exposed["dp"] = _exposed_dp(train, layout, cluster, shared, experts, m, compute_fwd, compute_bwd, layers)
    shards = layout.dp * layout.cp if layout.zero >= 1 else 1
    optimizer = optimizer_seconds(shared / shards + experts / max(1, shards // layout.ep), gpu, train,
                                  layers * PARAM_TENSORS_PER_BLOCK + 3, layout.tp)

    step = compute + bubble + sum(exposed.values()) + optimizer
    memory = memory_per_gpu(model, train, layout, gpu)
    tokens = train.global_batch * train.seq_len
    flops = model_flops_per_step(model, train)
    achieved = flops / (step * cluster.gpus)
    return Estimate(
        layout=layout, step_time_s=step, compute_s=compute, bubble_s=bubble, optimizer_s=optimizer,
        exposed_comm_s=exposed, memory=memory, fits=memory.total <= gpu.memory_bytes,
        tokens_per_s_per_gpu=tokens / (step * cluster.gpus), model_tflops_per_gpu=achieved / 1e12,
        mfu=achieved / gpu.peak_flops(train.dtype),
    )


def _exposed_dp(train: PlanTrain, layout: Layout, cluster: Cluster, shared: float, experts: float, m: int,
                fwd_s: float, bwd_s: float, layers: int) -> float:
    """Data-parallel seconds not hidden behind compute, per step.

    ZeRO-0/1 all-reduce (or reduce-scatter + all-gather, the same bytes) the gradients once per
    step, after the last micro-batch's backward, which they overlap bucket by bucket except the
    last bucket (one block). ZeRO-2 reduce-scatters every micro-batch's gradients (overlapping its
    backward) and all-gathers the new weights once. ZeRO-3 also all-gathers the weights before
    each forward and backward, prefetched behind the previous block's compute.
    """
    group, stride = layout.dp * layout.cp, layout.tp
    if group == 1:
        return 0.0
    weight_bytes = 4 if train.dtype == "fp32" else 2
    expert_group = max(1, group // layout.ep)
    payload = weight_bytes * shared
    expert_payload = weight_bytes * experts

    def reduce(nbytes: float, ranks: int, kind: str) -> float:
        fn = comm.all_reduce if kind == "all_reduce" else comm.reduce_scatter
        return fn(cluster, ranks, stride, nbytes)

    def both(kind: str) -> float:
        return reduce(payload, group, kind) + reduce(expert_payload, expert_group, kind)

    # Ranks that share cores pay for communication with the cores they compute on (loopback
    # copies, the collective's own thread): nothing is hidden.
    overlap = train.overlap_grad_reduce and cluster.gpu.core_share >= 1.0
    if layout.zero <= 1:
        grads = both("all_reduce")
        return max(grads - bwd_s, grads / layers) if overlap else grads
    gather = both("reduce_scatter")  # an all-gather moves the same bytes as a reduce-scatter
    if layout.zero == 2:
        per_mb = max(gather - bwd_s, gather / layers) if overlap else gather
        return m * per_mb + gather
    per_mb_comm = 3 * gather  # gather for forward, gather for backward, reduce-scatter gradients
    if not overlap:
        return m * per_mb_comm
    return m * max(per_mb_comm - (fwd_s + bwd_s), per_mb_comm / layers)
