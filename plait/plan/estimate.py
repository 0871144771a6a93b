"""One layout's step: compute, exposed communication by dimension, bubble, optimizer, memory.

The step on the critical path (the first pipeline stage, which waits longest) is

    m x (F + B) + bubble(F, B) + pipeline sends + exposed data-parallel traffic + host copies + optimizer

where F and B are one micro-batch's forward and backward (with recompute) through the rank's
layers, including the tensor-, context- and expert-parallel communication that cannot overlap
(it sits between dependent kernels). Data-parallel traffic overlaps backward when the framework
buckets it (``train.overlap_grad_reduce``); ring attention's K/V passing overlaps the attention
it feeds. The [memory] options (plait/plan/offload.py) add host-link copies and, with offload,
move the optimizer step to the host; token-wise recompute adds its share of forward to backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from plait.plan import comm
from plait.plan.compute import (
    DTYPE_BYTES, PARAM_TENSORS_PER_BLOCK, block_cost, head_cost, model_flops_per_step, optimizer_seconds, tokens_per_gpu,
)
from plait.plan.hardware import Cluster
from plait.layout import Layout
from plait.plan.memory import Memory, block_activation_bytes, fits, memory_per_gpu, stage_params
from plait.plan.offload import offload_time
from plait.layout import bubble_seconds
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
            "host_memory_gib": self.memory.host_gib(),
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


def _per_block_comm(model: PlanModel, train: PlanTrain, layout: Layout, cluster: Cluster, core_s: float,
                    passes: int) -> dict[str, float]:
    """Exposed TP, CP and EP seconds of one block per pass (forward, recomputed forward,
    backward): the block's total over its ``passes`` divided by ``passes``."""
    e, strides = DTYPE_BYTES[train.dtype], placement(layout)
    rows = tokens_per_gpu(train, layout)
    activation = e * rows * model.dim  # one micro-batch's residual stream on this cp rank
    # TP: two all-reduces per block (after attention, after the MLP); with sequence parallelism
    # each is an all-gather before the sublayer plus a reduce-scatter after it, the same bytes
    # on NCCL, two collectives' latency.
    if train.sequence_parallel:
        tp = 2 * (comm.all_gather(cluster, layout.tp, strides.tp, activation)
                  + comm.reduce_scatter(cluster, layout.tp, strides.tp, activation))
    else:
        tp = 2 * comm.all_reduce(cluster, layout.tp, strides.tp, activation)
    cp = 0.0
    if layout.cp > 1:
        if train.cp_mode == "ring":
            kv_block = e * rows * 2 * model.kv_dim / layout.tp
            step = comm.point_to_point(cluster, layout.cp, strides.cp, kv_block)
            overlap = cluster.gpu.core_share >= 1.0  # see _exposed_dp
            # Forward passes K/V around the ring (cp - 1 hops); backward passes K/V again and
            # the dK/dV accumulators, which go all the way home (cp hops). Each hop hides
            # behind the attention being computed (backward's is 2.5x forward's).
            forward = max(0.0, (layout.cp - 1) * step - (core_s if overlap else 0.0))
            backward = max(0.0, (2 * layout.cp - 1) * step - (2.5 * core_s if overlap else 0.0))
            cp = ((passes - 1) * forward + backward) / passes
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
    # Forward once, backward once, and once more when full recompute reruns the forward.
    passes = 3 if layout.recompute == "full" else 2
    block_comm = _per_block_comm(model, train, layout, cluster, block.attention_core_s, passes)
    comm_fwd = layers * sum(block_comm.values())

    # The output layer and loss sit on the last stage (with one stage, on the only one); that
    # stage paces the pipeline. The embedding lookup costs no FLOPs worth counting.
    head = head_cost(model, train, layout, gpu)
    # Ranks that share cores may run a training step slower than their share of the cores
    # predicts: the calibrated ``sharing_slowdown``; 1 on GPUs.
    slowdown = gpu.sharing_slowdown if gpu.core_share < 1.0 else 1.0
    compute_fwd = slowdown * (layers * block.forward_s + head / 3)
    fraction = layout.recompute_fraction if layout.recompute == "none" else 0.0
    compute_bwd = slowdown * (layers * (block.with_recompute(layout.recompute, fraction) - block.forward_s)
                              + 2 * head / 3)
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
    exposed["tp"] += m * _head_tp_comm(model, train, layout, cluster)
    e = DTYPE_BYTES[train.dtype]
    exposed["pp"] = 0.0
    if layout.pp > 1:
        boundary = e * tokens_per_gpu(train, layout) * model.dim / layout.tp
        send = comm.point_to_point(cluster, layout.pp, strides.pp, boundary)
        # Each micro-batch enters and leaves each of the rank's v chunks forward and backward;
        # the fill and drain add a send per stage.
        exposed["pp"] = send * (2 * layout.vpp * m + 2 * (layout.pp - 1))

    shared, experts = stage_params(model, layout, first=True, last=layout.pp == 1)
    tensors = layers * PARAM_TENSORS_PER_BLOCK + 3  # the stage's parameter tensors (+ embedding, norm, output)
    exposed["dp"] = _exposed_dp(train, layout, cluster, shared, experts, m, compute_fwd, compute_bwd, layers,
                                model.shared_block_params() / layout.tp, tensors)
    shards = layout.dp * layout.cp if layout.zero >= 1 else 1
    updated = shared / shards + experts / max(1, shards // layout.ep)  # parameters this rank's optimizer steps
    optimizer = slowdown * optimizer_seconds(updated, gpu, train, tensors, layout.tp)
    # Host copies of offloaded state and activations; with offload the update runs on the host.
    kept = block_activation_bytes(model, train, layout, layout.recompute, fraction)
    host = offload_time(model, train, layout, gpu, block, kept, updated, shared, m, layers)
    exposed["host"] = host.transfer_s
    if layout.offload != "none":
        optimizer = host.host_optimizer_s

    step = compute + bubble + sum(exposed.values()) + optimizer
    memory = memory_per_gpu(model, train, layout, gpu)
    tokens = train.global_batch * train.seq_len
    flops = model_flops_per_step(model, train)
    achieved = flops / (step * cluster.gpus)
    return Estimate(
        layout=layout, step_time_s=step, compute_s=compute, bubble_s=bubble, optimizer_s=optimizer,
        exposed_comm_s=exposed, memory=memory, fits=fits(memory, gpu),
        tokens_per_s_per_gpu=tokens / (step * cluster.gpus), model_tflops_per_gpu=achieved / 1e12,
        mfu=achieved / gpu.peak_flops(train.dtype),
    )


def _head_tp_comm(model: PlanModel, train: PlanTrain, layout: Layout, cluster: Cluster) -> float:
    """TP seconds per micro-batch outside the blocks, forward and backward: with sequence
    parallelism the embedding's output is reduce-scattered and the final norm's gathered for the
    output layer (and the reverse in backward); the vocabulary-parallel loss all-reduces three
    per-token values (max logit, sum of exponentials, target logit)."""
    if layout.tp == 1:
        return 0.0
    rows = tokens_per_gpu(train, layout)
    activation = DTYPE_BYTES[train.dtype] * rows * model.dim
    seconds = 3 * comm.all_reduce(cluster, layout.tp, 1, 4 * rows)
    if train.sequence_parallel:
        seconds += 2 * (comm.all_gather(cluster, layout.tp, 1, activation)
                        + comm.reduce_scatter(cluster, layout.tp, 1, activation))
    return seconds


def _exposed_dp(train: PlanTrain, layout: Layout, cluster: Cluster, shared: float, experts: float, m: int,
                fwd_s: float, bwd_s: float, layers: int, block_shared: float, tensors: int) -> float:
    """Data-parallel seconds not hidden behind compute, per step, plus the compute that the hidden
    part slows down (``GpuSpec.comm_overlap_slowdown``).

    ZeRO-0/1 all-reduce the gradients once per step, after the last micro-batch's backward,
    which they overlap bucket by bucket except the last bucket (one block); ZeRO-1 then sends
    the updated parameters from their owners (an all-gather's bytes). ZeRO-2 reduce-scatters
    every micro-batch's gradients (overlapping its backward) and all-gathers the new weights once.
    ZeRO-3 gathers each wrapped unit (every block, and the root: embedding, final norm, output
    layer) before its forward and again before its backward, and reduce-scatters its gradients
    (in ``train.reduce_dtype``), one collective per unit: see ``_zero3_per_micro_batch``.
    """
    group, stride = layout.dp * layout.cp, layout.tp
    if group == 1:
        return 0.0
    weight_bytes = 4 if train.dtype == "fp32" else 2
    expert_group = max(1, group // layout.ep)

    collectives = {"all_reduce": comm.all_reduce, "reduce_scatter": comm.reduce_scatter, "all_gather": comm.all_gather}

    def both(kind: str, dense: float = shared, expert: float = experts, element_bytes: int = weight_bytes) -> float:
        """One collective of ``kind`` over the dense weights and one over the expert weights."""
        fn = collectives[kind]
        seconds = fn(cluster, group, stride, element_bytes * dense) if dense else 0.0
        if expert:
            seconds += fn(cluster, expert_group, stride, element_bytes * expert)
        return seconds

    # Ranks that share cores pay for communication with the cores they compute on (loopback
    # copies, the collective's own thread): nothing is hidden.
    overlap = train.overlap_grad_reduce and cluster.gpu.core_share >= 1.0
    slowdown = cluster.gpu.comm_overlap_slowdown

    def exposed_and_slowed(total: float, exposed: float) -> float:
        return exposed + slowdown * (total - exposed)

    if layout.zero <= 1:
        grads = both("all_reduce")
        exposed = exposed_and_slowed(grads, max(grads - bwd_s, grads / layers)) if overlap else grads
        if layout.zero == 1:
            # Each rank updates the parameters it owns and sends them to the others after the
            # optimizer step, with nothing left to hide behind: an all-gather's bytes, and one
            # broadcast per parameter tensor (torch's ZeroRedundancyOptimizer without bucket
            # views), which the process group runs one after another, each paying a collective's
            # latency.
            exposed += both("all_gather") + (tensors - 1) * comm.ring_latency(
                cluster, comm.group_shape(cluster, group, stride), 1.0)
        return exposed
    if layout.zero == 2:
        scatter = both("reduce_scatter")
        per_mb = exposed_and_slowed(scatter, max(scatter - bwd_s, scatter / layers)) if overlap else scatter
        return m * per_mb + both("all_gather")
    reduce_bytes = 4 if train.reduce_dtype == "fp32" or train.dtype == "fp32" else 2
    block_experts = experts / layers
    root = shared - layers * block_shared  # embedding, final norm, output layer
    gather_block, gather_root = both("all_gather", block_shared, block_experts), both("all_gather", root, 0.0)
    scatter_block = both("reduce_scatter", block_shared, block_experts, reduce_bytes)
    scatter_root = both("reduce_scatter", root, 0.0, reduce_bytes)
    total = 2 * (layers * gather_block + gather_root) + layers * scatter_block + scatter_root
    if not overlap:
        return m * total
    block_fwd, block_bwd = fwd_s / layers, bwd_s / layers
    # Forward (prefetch depth memory.ZERO3_PREFETCH = 1): the root and the first block are gathered
    # before any compute can hide them; each later block's gather runs beside the previous block's forward and delays the next block by
    # what is left over.
    forward = gather_root + gather_block + (layers - 1) * max(0.0, gather_block - block_fwd)
    # Backward: a block's backward runs beside the re-gather of the block before it and the
    # reduce-scatter of the block after it, which share the link; the first re-gather hides
    # behind the output layer's backward; the last block's and the root's reduce-scatters end
    # the step with nothing to hide behind.
    backward = (layers - 1) * max(0.0, gather_block + scatter_block - block_bwd) + scatter_block + scatter_root
    return m * exposed_and_slowed(total, min(total, forward + backward))
