"""The planner's terms for large sharded runs (collective algorithms, the fabric, ZeRO-3's
prefetch-bounded overlap and buffers), op recompute priced by its operators, and the validation
and uncertainty it reports."""

from __future__ import annotations

from dataclasses import replace

import pytest

from plait.layout import Layout
from plait.plan import comm
from plait.plan.compute import OPS_PER_BLOCK, SAVED_OPS_PER_BLOCK, block_cost
from plait.plan.estimate import estimate
from plait.plan.memory import (
    BUCKET_BYTES, ZERO3_PREFETCH, block_activations, bucket_bytes, gathered_bytes, memory_per_gpu, stage_params,
)
from plait.plan.spec import PlanCluster, PlanModel, PlanTrain, build_cluster
from plait.plan.validation import (
    PUBLISHED_RUNS, Uncertainty, band_from, layout_class, leave_one_out, rms, uncertainty,
)


def gpt(layers: int = 8, dim: int = 4096, heads: int = 32) -> PlanModel:
    return PlanModel(n_layers=layers, dim=dim, n_heads=heads, ffn_dim=4 * dim, vocab_size=51200, mlp="gelu")


def layout(**kw) -> Layout:
    base = dict(tp=1, pp=1, vpp=1, dp=1, cp=1, ep=1, micro_batch=1, zero=0, recompute="none", schedule="1f1b")
    return Layout(**{**base, **kw})


def cluster(gpus: int, gpu: str = "a100-80gb", **kw):
    return build_cluster(PlanCluster(gpu=gpu, gpus=gpus, gpus_per_node=8, **kw))


# collectives and the fabric ---------------------------------------------------------------------

def test_ring_latency_counts_every_member_not_every_node():
    """A ring all-gather over 256 ranks in 32 nodes takes 255 steps: 31 across the network and
    224 inside nodes (NCCL's ring model), not 7 + 31."""
    c = cluster(256)
    shape = comm.group_shape(c, 256, 1)
    assert (shape.per_node, shape.nodes) == (8, 32)
    expected = 224 * c.intra_link.latency_s + 31 * c.inter_link.step_latency_s
    assert comm.ring_latency(c, shape, 1.0) == pytest.approx(expected)
    no_bytes = comm.all_gather(c, 256, 1, 0.0)
    assert no_bytes == pytest.approx(expected)
    # At a fixed number of nodes it grows with the members: 8 per node cost 224 steps more than 1.
    one_per_node = comm.all_gather(c, 32, 8, 0.0)
    assert one_per_node == pytest.approx(31 * c.inter_link.step_latency_s)
    assert no_bytes - one_per_node == pytest.approx(224 * c.intra_link.latency_s)


def test_collective_steps_use_the_protocols_step_latency():
    link = cluster(16).inter_link
    assert link.step_latency_s == pytest.approx(14e-6) and link.latency_s == pytest.approx(5e-6)
    overridden = build_cluster(PlanCluster(gpu="a100-80gb", gpus=16, gpus_per_node=8, inter_latency_us=2))
    assert overridden.inter_link.step_latency_s == pytest.approx(2e-6)
    # Point-to-point sends keep the message latency.
    assert comm.point_to_point(cluster(16), 2, 8, 0.0) == pytest.approx(5e-6)


def test_all_reduce_takes_the_tree_when_latency_dominates():
    """Across many nodes a small all-reduce goes up and down a tree (2 log2(nodes) network steps),
    a large one around the ring (the tree reaches TREE_BANDWIDTH of its rate)."""
    c = cluster(8192)
    shape = comm.group_shape(c, 1024, 8)  # one member per node, 1024 nodes
    small = comm.all_reduce(c, 1024, 8, 1e3)
    tree = comm.tree_latency(c, shape) + comm._bandwidth_seconds(c, shape, 1e3, 2.0) / comm.TREE_BANDWIDTH
    assert small == pytest.approx(tree)
    assert comm.tree_latency(c, shape) == pytest.approx(2 * 10 * comm.network_latency(c, 1024))
    large = comm.all_reduce(c, 1024, 8, 1e10)
    assert large == pytest.approx(comm._bandwidth_seconds(c, shape, 1e10, 2.0) + comm.ring_latency(c, shape, 2.0))


def test_fabric_tiers_cost_switch_hops_and_spine_bandwidth():
    c = cluster(8)
    assert [comm.fabric_tiers(c, n) for n in (1, 32, 33, 1024, 1025)] == [1, 1, 2, 2, 3]
    link = c.inter_link
    assert comm.network_rate(c, 32) == pytest.approx(link.achieved_bytes_per_s)
    assert comm.network_rate(c, 64) == pytest.approx(link.achieved_bytes_per_s * link.spine_efficiency)
    assert comm.network_rate(c, 4096) == pytest.approx(link.achieved_bytes_per_s * link.spine_efficiency ** 2)
    assert comm.network_latency(c, 4096) == pytest.approx(link.step_latency_s + 4 * link.switch_latency_s)
    wide = build_cluster(PlanCluster(gpu="a100-80gb", gpus=8, gpus_per_node=8, nodes_per_leaf=64))
    assert comm.fabric_tiers(wide, 64) == 1
    # Bytes across the spine take longer than the same bytes inside one leaf.
    within, across = (comm.all_gather(cluster(8 * n), n, 8, 1e9) for n in (32, 64))
    assert across > within * 1.1


# ZeRO-3 at scale --------------------------------------------------------------------------------

def test_zero3_step_rises_with_the_data_parallel_group_at_a_fixed_per_gpu_batch():
    """The effect published FSDP/ZeRO-3 runs show: with the per-GPU batch fixed, each unit's
    gathers and reduce-scatters take longer as the group grows (a ring visits every member), and
    the step slows with them."""
    model = gpt(layers=96, dim=12288, heads=96)
    times, exposed = [], []
    for gpus in (64, 256, 1024, 4096):
        train = PlanTrain(global_batch=gpus, seq_len=2048)
        est = estimate(model, train, cluster(gpus), layout(dp=gpus, zero=3, recompute="full"))
        times.append(est.step_time_s)
        exposed.append(est.exposed_comm_s["dp"])
    assert times == sorted(times) and times[-1] > 1.2 * times[0]
    assert exposed == sorted(exposed)


def test_zero3_overlap_is_bounded_by_one_block_of_prefetch():
    """With overlap, each block's gather hides behind one block's compute and no more: the
    exposed part is what exceeds it, block by block, plus the gathers and reduce-scatters that
    start and end the step, plus the compute slowed by the hidden rest."""
    model, c = gpt(), cluster(64)
    train = PlanTrain(global_batch=64, seq_len=2048, reduce_dtype="bf16")
    lo = layout(dp=64, zero=3)
    est = estimate(model, train, c, lo)
    layers = model.n_layers
    shared, _ = stage_params(model, lo, first=True, last=True)
    block = model.shared_block_params()
    root = shared - layers * block
    gather, gather_root = comm.all_gather(c, 64, 1, 2 * block), comm.all_gather(c, 64, 1, 2 * root)
    scatter, scatter_root = comm.reduce_scatter(c, 64, 1, 2 * block), comm.reduce_scatter(c, 64, 1, 2 * root)
    cost = block_cost(model, train, lo, c.gpu)
    head_fwd = (est.compute_s - layers * (cost.forward_s + cost.backward_s)) / 3
    fwd, bwd = cost.forward_s + head_fwd / layers, cost.backward_s + 2 * head_fwd / layers
    forward = gather_root + gather + (layers - 1) * max(0.0, gather - fwd)
    backward = (layers - 1) * max(0.0, gather + scatter - bwd) + scatter + scatter_root
    total = 2 * (layers * gather + gather_root) + layers * scatter + scatter_root
    exposed = forward + backward
    assert est.exposed_comm_s["dp"] == pytest.approx(exposed + c.gpu.comm_overlap_slowdown * (total - exposed))
    # The compute beside a collective slows: without that the same layout is faster by exactly it.
    calm = replace(c, gpu=replace(c.gpu, comm_overlap_slowdown=0.0))
    assert estimate(model, train, calm, lo).exposed_comm_s["dp"] == pytest.approx(exposed)


def test_zero3_reduce_scatters_gradients_in_the_reduce_dtype():
    model, c = gpt(), cluster(64)
    no_overlap = PlanTrain(global_batch=64, seq_len=2048, overlap_grad_reduce=False)
    fp32, bf16 = (estimate(model, replace(no_overlap, reduce_dtype=d), c, layout(dp=64, zero=3)).exposed_comm_s["dp"]
                  for d in ("fp32", "bf16"))
    block = model.shared_block_params()
    root = stage_params(model, layout(dp=64), first=True, last=True)[0] - model.n_layers * block
    extra = sum(count * (comm.reduce_scatter(c, 64, 1, 4 * size) - comm.reduce_scatter(c, 64, 1, 2 * size))
                for count, size in ((model.n_layers, block), (1, root)))
    assert fp32 - bf16 == pytest.approx(extra)


def test_zero3_memory_holds_prefetched_units_the_root_and_unsharded_gradients():
    model = gpt()
    train = PlanTrain(global_batch=64, seq_len=2048)
    lo = layout(dp=64, zero=3)
    shared, _ = stage_params(model, lo, first=True, last=True)
    root = shared - model.n_layers * model.shared_block_params()
    block = 2 * model.shared_block_params()
    expected = (1 + ZERO3_PREFETCH) * block + 2 * root + 4 * (root + model.shared_block_params())
    assert gathered_bytes(model, train, lo, shared, block) == pytest.approx(expected)
    mem = memory_per_gpu(model, train, lo, build_cluster(PlanCluster(gpu="a100-80gb", gpus=64)).gpu)
    assert mem.transient == pytest.approx(expected)
    # ZeRO-0/1/2 hold their gradient buckets instead; one rank holds none.
    assert bucket_bytes(layout(dp=8)) == 2 * BUCKET_BYTES and bucket_bytes(layout()) == 0
    assert bucket_bytes(layout(dp=8, zero=3)) == 0


# op recompute ------------------------------------------------------------------------------------

def test_op_recompute_reruns_the_operators_between_the_matmuls():
    model, c = gpt(), cluster(8)
    for kernels in ("fused", "eager"):
        train = PlanTrain(global_batch=8, seq_len=2048, kernels=kernels)
        cost = block_cost(model, train, layout(), c.gpu)
        between = OPS_PER_BLOCK[kernels][0] - SAVED_OPS_PER_BLOCK
        assert cost.with_recompute("op") - cost.with_recompute("none") == pytest.approx(cost.between_matmuls_s)
        assert cost.between_matmuls_s >= between * c.gpu.op_overhead_s
        assert cost.with_recompute("none") < cost.with_recompute("op") < cost.with_recompute("full")


def test_op_recompute_keeps_matmul_outputs_between_none_and_full():
    model = gpt()
    train = PlanTrain(global_batch=8, seq_len=2048)
    parts = block_activations(model, train, layout())
    assert parts.kept("full") < parts.kept("op") < parts.kept("none")
    assert parts.kept("op") == pytest.approx(parts.block_input + parts.matmul_outputs)
    assert parts.rebuilt("op") == pytest.approx(parts.core + parts.region_a + parts.region_b - parts.matmul_outputs)


# validation and uncertainty ------------------------------------------------------------------------

def test_layout_classes():
    assert layout_class(layout(pp=2, tp=8, cp=2)) == "pipeline"
    assert layout_class(layout(cp=2, tp=2)) == "context"
    assert layout_class(layout(tp=2, zero=3)) == "tensor"
    assert layout_class(layout(dp=8, zero=3)) == "sharded"
    assert layout_class(layout(dp=8, zero=1)) == "replicated"


def test_band_is_the_rms_error_of_its_class_or_of_all_runs():
    errors = [("tensor", 0.1), ("tensor", -0.2), ("tensor", 0.2), ("sharded", 0.5)]
    relative, runs, scope = band_from(errors, "tensor")
    assert relative == pytest.approx(rms([0.1, -0.2, 0.2])) and (runs, scope) == (3, "tensor")
    relative, runs, scope = band_from(errors, "sharded")  # one run of its own: all of them
    assert relative == pytest.approx(rms([0.1, -0.2, 0.2, 0.5])) and (runs, scope) == (4, "all")
    held = leave_one_out(errors)
    assert held[0] == (0.1, pytest.approx(rms([-0.2, 0.2, 0.5])))  # two tensor runs left: all the others
    assert Uncertainty("tensor", 0.1, 3, "tensor").record(2.0)["step_time_s"] == [1.8, 2.2]


def test_published_validation_runs_fit_and_give_gpu_bands():
    """Every published run was trained: the planner must predict that it fits. GPU bands come
    from their errors."""
    for run in PUBLISHED_RUNS:
        lo = Layout(**{"schedule": "1f1b", **run.layout})
        est = estimate(PlanModel(**run.model), PlanTrain(**run.train), build_cluster(PlanCluster(**run.cluster)), lo)
        assert est.fits, run.name
    band = uncertainty(layout(pp=8, tp=8), cpu=False)
    assert band.layout_class == "pipeline" and band.scope == "pipeline" and 0 < band.relative < 0.5
    errors = [run.error() for run in PUBLISHED_RUNS if run.layout_class == "pipeline"]
    assert band.relative == pytest.approx(rms(errors))


def test_refresh_measures_the_drifting_rates_again(monkeypatch):
    """bench/planner_local.py refreshes the profile before each layout: the GEMM curve, memory
    rate and sharing slowdown are replaced, the rest (links, host costs) kept."""
    from plait.plan import calibrate

    rates = {d: 80e9 * d / (d + 8) for d in calibrate.GEMM_DIMS}
    measured = {"rates": rates, "memory_bytes_per_s": 7e9, "world": 4,
                "sharing": {"alone_s": [0.1, 0.1, 0.1], "shared_s": [0.25, 0.22, 0.3], "cores": 2}}
    monkeypatch.setattr(calibrate, "spawn", lambda fn, ranks: [measured] * ranks)
    old = {"matmul_flops": 1e9, "gemm_half_dim": 1.0, "memory_bytes_per_s": 1e9, "sharing_slowdown": 1.0,
           "link_latency_s": 1e-3, "op_overhead_s": 9e-6}
    fresh = calibrate.refresh(old, 4)
    assert fresh["matmul_flops"] == pytest.approx(80e9, rel=1e-3) and fresh["gemm_half_dim"] == pytest.approx(8, rel=1e-3)
    assert fresh["memory_bytes_per_s"] == 7e9 and fresh["sharing_slowdown"] == pytest.approx(1.25)
    assert fresh["link_latency_s"] == 1e-3 and fresh["op_overhead_s"] == 9e-6


def test_cpu_bands_come_from_plaits_own_runs():
    """On the cpu profile the bands rest on plait's own measured steps (plait/plan/local_runs.py),
    every class with runs of its own."""
    from plait.plan.validation import CLASSES, local_runs, validation_errors

    runs = local_runs()
    assert len(runs) >= 30 and {run.layout_class for run in runs} == set(CLASSES)
    assert all(run.profile and run.measured_s > 0 for run in runs)
    band = uncertainty(layout(dp=4, zero=3), cpu=True)
    own = [e for c, e in validation_errors(True) if c == "sharded"]
    assert band.scope == "sharded" and band.runs == len(own) and band.relative == pytest.approx(rms(own))


def test_hopper_flash_attention_runs_below_its_gemms():
    """FlashAttention-2-class kernels reach ~35-40% of an H100's peak against the GEMMs' ~62%:
    the attention core costs 1/0.6 of what GEMM-rate attention would; on A100 they match."""
    model, train = gpt(), PlanTrain(global_batch=8, seq_len=8192)
    h100 = cluster(8, gpu="h100-sxm").gpu
    assert cluster(8).gpu.attention_efficiency == 1.0 and h100.attention_efficiency == 0.6
    slow = block_cost(model, train, layout(), h100).attention_core_s
    gemm_rate = block_cost(model, train, layout(), replace(h100, attention_efficiency=1.0)).attention_core_s
    assert slow == pytest.approx(gemm_rate / 0.6)
