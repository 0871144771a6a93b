"""Measure this machine for the planner's ``cpu`` entry, with N local ranks running at once
(they share the cores, as the ranks of ``plait train`` do):

- matmul FLOP/s by GEMM size, and memory bandwidth;
- flash attention's FLOP rate (``F.scaled_dot_product_attention``, forward and backward) as a
  fraction of a GEMM's at its head dimension;
- the host time per operator: a tiny plait Llama trained eagerly, where compute is nothing and
  the time is the dispatch of its operators (block minus block, over OPS_PER_BLOCK), and the
  same model under plait's tensor-parallel plan on a one-rank mesh (DTensor dispatch, no
  traffic), over DTENSOR_OPS_PER_BLOCK;
- how much slower a small Llama's forward and backward runs when every rank runs it at once
  than rank 0 alone times ranks per core (``sharing_slowdown``; medians);
- gloo all-reduce bandwidth (back to back), and its latency while the ranks compute between
  collectives, as training does: on ranks that share cores a collective waits until every
  member is scheduled, which costs far more than the loopback round trip;
- a send/recv exchange between paired ranks after each burst of compute (pipeline sends,
  ring-attention hops): its latency and bandwidth under load, both far worse than idle.

The fits are the cost model's own forms: achieved FLOP/s = peak x d / (d + half_dim) on a GEMM's
smallest dimension d, and all-reduce time = 2(n-1) x latency + 2(n-1)/n x bytes /
bandwidth (a line in bytes).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import loss_parallel

from plait.config import build_config
from plait.launch import spawn, usable_cores
from plait.models.llama import Llama
from plait.parallel.tensor_parallel import apply_tensor_parallel
from plait.plan.compute import DTENSOR_OPS_PER_BLOCK, OPS_PER_BLOCK
from plait.plan.hardware import default_profile_path
from plait.train.loss import token_loss_sum

GEMM_DIMS = (16, 32, 64, 128, 256, 512)
GEMM_ROUNDS = 3
ALL_REDUCE_BYTES = (4 * 2**10, 64 * 2**10, 2**20, 4 * 2**20, 16 * 2**20)


def _timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    samples = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - begin)
    return statistics.median(samples)


def _sustained_rate(fn, work: float, window_s: float = 0.4) -> float:
    """``work`` units per call x calls per second, running ``fn`` back to back for ``window_s``
    while every other rank does the same: the rate each rank gets when all of them compute, as
    they do in a training step on shared cores."""
    fn()
    dist.barrier()
    calls, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < window_s:
        fn()
        calls += 1
    return calls * work / (time.perf_counter() - begin)


ATTENTION_SHAPE = (4, 8, 256, 32)  # batch, heads, sequence, head dimension
TINY_MODEL = {"model.dim": 16, "model.n_heads": 2, "model.ffn_dim": 32, "model.vocab_size": 64,
              "model.max_seq_len": 8, "train.seq_len": 8,
              "train.micro_batch": 1, "train.global_batch": 64}


def attention_flops(batch: int, heads: int, seq: int, head_dim: int) -> float:
    """FLOPs the cost model counts for causal flash attention, forward (two GEMMs over the
    unmasked half) and backward (2.5x)."""
    return 3.5 * 2 * 2 * batch * heads * seq * (seq / 2) * head_dim


def _iteration_times(fn, iterations: int) -> list[float]:
    """Seconds of each of ``iterations`` calls of ``fn`` (the same count on every rank)."""
    fn()
    dist.barrier()
    times = []
    for _ in range(iterations):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return times


def _fixed_loop(fn, iterations: int) -> float:
    """Mean seconds of ``fn()`` over a fixed count (collectives need the same count everywhere)."""
    return statistics.fmean(_iteration_times(fn, iterations))


def _tiny_step_s(layers: int, tp_mesh=None) -> float:
    """Seconds of one forward + backward of a tiny plait Llama with ``layers`` blocks (eager;
    under tensor parallelism on ``tp_mesh`` if given). Its compute is negligible: this is host time."""

    cfg = build_config(values={**TINY_MODEL, "model.n_layers": layers})
    model = Llama(cfg.model)
    context = contextlib.nullcontext
    if tp_mesh is not None:
        apply_tensor_parallel(model, tp_mesh)
        context = loss_parallel
    ids = torch.randint(0, cfg.model.vocab_size, (1, cfg.train.seq_len))

    def step():
        with context():
            token_loss_sum(model(ids), ids).backward()

    return _sustained_rate(step, 1.0, window_s=0.5) ** -1


def _host_costs() -> dict:
    """Per-operator host seconds, eager and DTensor (see the module docstring)."""

    rank, world = dist.get_rank(), dist.get_world_size()
    own = None
    for r in range(world):  # every rank takes part in creating every group
        group = dist.new_group([r])
        own = group if r == rank else own
    mesh = DeviceMesh.from_group(own, "cpu")
    # Differences of two timings are noisy: the median of a few rounds.
    eager_block = statistics.median((_tiny_step_s(3) - _tiny_step_s(1)) / 2 for _ in range(GEMM_ROUNDS))
    tp_block = statistics.median((_tiny_step_s(3, mesh) - _tiny_step_s(1, mesh)) / 2 for _ in range(GEMM_ROUNDS))
    return {"op_s": max(eager_block, 0.0) / sum(OPS_PER_BLOCK["eager"]),
            "dtensor_op_s": max(tp_block - eager_block, 0.0) / DTENSOR_OPS_PER_BLOCK}


# A working set of tens of MB (weights, activations, gradients), as a small training step has.
SHARING_MODEL = {"model.dim": 256, "model.n_heads": 8, "model.ffn_dim": 768, "model.vocab_size": 512,
                 "model.max_seq_len": 256, "train.seq_len": 256, "model.n_layers": 2,
                 "train.micro_batch": 1, "train.global_batch": 64}


SHARING_ROUNDS = 3


def _sharing_times(world: int, cores: int) -> dict:
    """A small Llama's forward + backward (tens of MB of weights and activations, like a training
    step): seconds on rank 0 alone (``alone_s``, the others wait), then on every rank at once
    (``shared_s``, this rank's median), alternated over SHARING_ROUNDS rounds so that the
    machine's drift between the two phases cancels (``ratios``: each round's shared / alone, on
    rank 0). Empty where every rank has its own cores."""

    if world <= cores:
        return {}
    cfg = build_config(values=SHARING_MODEL)
    model = Llama(cfg.model)
    ids = torch.randint(0, cfg.model.vocab_size, (4, cfg.train.seq_len))
    step = lambda: token_loss_sum(model(ids), ids).backward()  # noqa: E731
    alone, shared = [], []
    for _ in range(SHARING_ROUNDS):
        dist.barrier()
        alone.append(_timed(step, 5) if dist.get_rank() == 0 else None)  # the others wait in the barrier below
        dist.barrier()
        shared.append(statistics.median(_iteration_times(step, 5)))
    return {"alone_s": alone, "shared_s": shared, "cores": cores}


def _loaded_latency(world: int) -> dict:
    """Extra seconds of a small all-reduce between compute bursts, over the whole group and over
    pairs (every pair at once), against the bursts alone."""

    rank = dist.get_rank()
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    burst = lambda: [a @ b for _ in range(4)]  # noqa: E731  (about a millisecond)
    pairs = [dist.new_group([r, r + 1]) for r in range(0, world - 1, 2)]
    buf = torch.zeros(16)
    alone = _fixed_loop(burst, 200)
    extra = {world: _fixed_loop(lambda: (burst(), dist.all_reduce(buf)), 200) - alone}
    if world >= 4 and world % 2 == 0:
        pair = pairs[rank // 2]
        extra[2] = _fixed_loop(lambda: (burst(), dist.all_reduce(buf, group=pair)), 200) - alone
    return extra


P2P_BYTES = (64, 512 * 2**10)


def _loaded_p2p(world: int) -> dict:
    """Extra seconds of a send/recv exchange between paired ranks (0-1, 2-3, ...; all pairs at
    once) after each burst of compute of a training block's size (several ms), against the
    bursts alone, for a tiny and a 512 KiB message: what a pipeline send or a ring-attention hop
    costs while the other ranks compute."""

    rank = dist.get_rank()
    peer = rank ^ 1
    if peer >= world:
        return {}
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    burst = lambda: [a @ b for _ in range(16)]  # noqa: E731
    alone = statistics.median(_iteration_times(burst, 30))
    extra = {}
    for nbytes in P2P_BYTES:
        send, recv = torch.zeros(nbytes // 4), torch.zeros(nbytes // 4)

        def exchange():
            burst()
            for work in (dist.isend(send, peer), dist.irecv(recv, peer)):
                work.wait()

        # Medians: a few iterations that catch a rank descheduled for long would swing a mean.
        extra[nbytes] = statistics.median(_iteration_times(exchange, 30)) - alone
    return extra


def _measure_rank() -> dict:
    """Runs on every rank at once: matmul and copy rates of this rank, all-reduce times of the group."""

    world = dist.get_world_size()
    # Three rounds over the sizes, the median of each: this machine's speed drifts by 10-20%
    # over seconds (other tenants), and one window per size lets a slow moment bend the fit.
    samples: dict[int, list[float]] = {d: [] for d in GEMM_DIMS}
    operands = {d: (torch.randn(1024, d), torch.randn(d, 1024)) for d in GEMM_DIMS}
    for _ in range(GEMM_ROUNDS):
        for d, (a, b) in operands.items():
            samples[d].append(_sustained_rate(lambda: a @ b, 2 * 1024 * 1024 * d))
    rates = {d: statistics.median(values) for d, values in samples.items()}
    src = torch.randn(8 * 2**20)
    dst = torch.empty_like(src)
    memory_rate = statistics.median(_sustained_rate(lambda: dst.copy_(src), 2 * src.numel() * 4)
                                    for _ in range(GEMM_ROUNDS))
    q, k, v = (torch.randn(*ATTENTION_SHAPE, requires_grad=True) for _ in range(3))
    attention = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()  # noqa: E731
    attention_rate = _sustained_rate(attention, attention_flops(*ATTENTION_SHAPE))
    host = _host_costs()
    sharing = _sharing_times(world, usable_cores())
    loaded = _loaded_latency(world)
    p2p = _loaded_p2p(world) if world % 2 == 0 else {}
    reduce_s = {}
    for nbytes in ALL_REDUCE_BYTES:
        buf = torch.zeros(nbytes // 4)
        dist.barrier()
        reduce_s[nbytes] = _timed(lambda: dist.all_reduce(buf), 5)
    return {"rates": rates, "memory_bytes_per_s": memory_rate, "reduce_s": reduce_s, "world": world,
            "attention_flops": attention_rate, **host, "loaded_s": loaded,
            "loaded_p2p_s": p2p, "sharing": sharing}


def fit_gemm_curve(rates: dict[int, float]) -> tuple[float, float]:
    """(peak FLOP/s, half dimension) of rate(d) = peak x d / (d + half), least relative error.
    The peak stays within 1.5x the best measured rate: the curve must not promise what the
    machine never showed."""
    best_rate = max(rates.values())
    best = (float("inf"), best_rate, 1.0)
    for half in [2 ** (i / 4) for i in range(0, 53)]:  # 1 .. 8192
        shape = {d: d / (d + half) for d in rates}
        peak = min(1.5 * best_rate, sum(rates[d] * shape[d] for d in rates) / sum(shape[d] ** 2 for d in rates))
        error = sum((peak * shape[d] / rates[d] - 1) ** 2 for d in rates)
        best = min(best, (error, peak, half))
    return best[1], best[2]


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def fit_profile(results: list[dict]) -> dict:
    """The profile (JSON-ready) from every rank's measurements."""
    world = results[0]["world"]
    mean_rate = {d: statistics.fmean(r["rates"][d] for r in results) for d in GEMM_DIMS}
    peak, half_dim = fit_gemm_curve(mean_rate)
    times = [statistics.fmean(r["reduce_s"][n] for r in results) for n in ALL_REDUCE_BYTES]
    fixed, per_byte = _line([float(n) for n in ALL_REDUCE_BYTES], times)
    steps = 2 * (world - 1)
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    latency = max(fixed / steps, 1e-6)
    if all("loaded_s" in r for r in results):
        # Latency per ring step under load: least squares over the group sizes measured, never
        # below the idle round trip.
        sizes = results[0]["loaded_s"].keys()
        extra = {n: statistics.fmean(r["loaded_s"][n] for r in results) for n in sizes}
        ring = {n: 2 * (int(n) - 1) for n in sizes}
        latency = max(latency, sum(extra[n] * ring[n] for n in sizes) / sum(ring[n] ** 2 for n in sizes))
    p2p = {}
    if all(r.get("loaded_p2p_s") for r in results):
        # A tiny exchange's time is the latency; the larger one's extra time is its bytes. Never
        # better than the idle link.
        small, large = (statistics.fmean(r["loaded_p2p_s"][n] for r in results) for n in P2P_BYTES)
        p2p["p2p_latency_s"] = max(latency, small)
        idle_rate = (steps / world) / per_byte if per_byte > 0 else 1e9
        p2p["p2p_bytes_per_s"] = min(idle_rate, (P2P_BYTES[1] - P2P_BYTES[0]) / max(large - small, 1e-9))
    host = {}
    if all("op_s" in r for r in results):
        head_dim = ATTENTION_SHAPE[-1]
        gemm_at_head_dim = peak * head_dim / (head_dim + half_dim)
        host = {
            "attention_efficiency": min(1.0, statistics.fmean(r["attention_flops"] for r in results) / gemm_at_head_dim),
            "op_overhead_s": statistics.fmean(r["op_s"] for r in results),
            "dtensor_op_s": statistics.fmean(r["dtensor_op_s"] for r in results),
        }
    if results[0].get("sharing"):
        host["sharing_slowdown"] = sharing_slowdown(results)
    return {
        "ranks": world,
        "cores": usable_cores(),
        "matmul_flops": peak,
        "gemm_half_dim": half_dim,
        "memory_bytes_per_s": statistics.fmean(r["memory_bytes_per_s"] for r in results),
        "memory_bytes": pages / world,
        "link_bytes_per_s": (steps / world) / per_byte if per_byte > 0 else 1e9,
        "link_latency_s": latency,
        **p2p,
        **host,
        "measured_gemm_flops": {str(d): mean_rate[d] for d in GEMM_DIMS},
        "measured_all_reduce_s": {str(n): t for n, t in zip(ALL_REDUCE_BYTES, times)},
    }


def sharing_slowdown(results: list[dict]) -> float:
    """Every rank's shared time against rank 0's alone time times ranks per core, round by round
    (the median of the rounds' ratios); never a speed-up."""
    world, cores = results[0]["world"], results[0]["sharing"]["cores"]
    rounds = len(results[0]["sharing"]["alone_s"])
    ratios = [statistics.fmean(r["sharing"]["shared_s"][i] for r in results)
              / (results[0]["sharing"]["alone_s"][i] * world / cores) for i in range(rounds)]
    return max(1.0, statistics.median(ratios))


def _measure_speed() -> dict:
    """Runs on every rank at once: the parts of the profile that drift with the machine's load
    (GEMM rates, memory rate, the sharing slowdown), for ``refresh``."""
    world = dist.get_world_size()
    operands = {d: (torch.randn(1024, d), torch.randn(d, 1024)) for d in GEMM_DIMS}
    rates = {d: statistics.median(_sustained_rate(lambda: a @ b, 2 * 1024 * 1024 * d, window_s=0.2)
                                  for _ in range(GEMM_ROUNDS)) for d, (a, b) in operands.items()}
    src = torch.randn(8 * 2**20)
    dst = torch.empty_like(src)
    memory_rate = statistics.median(_sustained_rate(lambda: dst.copy_(src), 2 * src.numel() * 4, window_s=0.2)
                                    for _ in range(GEMM_ROUNDS))
    return {"rates": rates, "memory_bytes_per_s": memory_rate, "world": world,
            "sharing": _sharing_times(world, usable_cores())}


def refresh(profile: dict, ranks: int) -> dict:
    """``profile`` with the GEMM curve, memory rate and sharing slowdown measured again now (a
    few seconds): this machine's speed drifts by 10-20% over minutes, and a prediction is only
    as good as the rates of the moment it describes."""
    results = spawn(_measure_speed, ranks)
    mean_rate = {d: statistics.fmean(r["rates"][d] for r in results) for d in GEMM_DIMS}
    peak, half_dim = fit_gemm_curve(mean_rate)
    fresh = {**profile, "matmul_flops": peak, "gemm_half_dim": half_dim,
             "memory_bytes_per_s": statistics.fmean(r["memory_bytes_per_s"] for r in results),
             "measured_gemm_flops": {str(d): mean_rate[d] for d in GEMM_DIMS}}
    if results[0].get("sharing"):
        fresh["sharing_slowdown"] = sharing_slowdown(results)
    return fresh


def calibrate(ranks: int) -> dict:
    """Measure with ``ranks`` local gloo ranks; returns the profile."""
    return fit_profile(spawn(_measure_rank, ranks))


def calibrate_command(path: str, ranks: int) -> str:
    """``plait plan --cluster.gpu cpu --calibrate``: measure, write the profile, print a summary;
    returns the profile's path."""
    path = path or default_profile_path()
    profile = calibrate(ranks)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(profile, fh, indent=1)
    print(f"calibrated {ranks} local ranks: matmul {profile['matmul_flops'] / 1e9:.1f} GFLOP/s per rank "
          f"(half at d = {profile['gemm_half_dim']:.0f}), memory {profile['memory_bytes_per_s'] / 1e9:.1f} GB/s, "
          f"attention at {profile['attention_efficiency']:.2f} of a GEMM, {profile['op_overhead_s'] * 1e6:.1f} us "
          f"per operator (+{profile['dtensor_op_s'] * 1e6:.0f} us on a DTensor), "
          f"gloo {profile['link_bytes_per_s'] / 1e9:.2f} GB/s with {profile['link_latency_s'] * 1e6:.0f} us latency "
          f"per ring step under load (a send/recv {profile.get('p2p_latency_s', 0) * 1e3:.1f} ms + "
          f"{profile.get('p2p_bytes_per_s', 0) / 1e6:.0f} MB/s), "
          f"training steps {profile.get('sharing_slowdown', 1.0):.2f}x slower on shared cores -> {path}")
    return path
