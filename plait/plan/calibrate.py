"""Measure this machine for the planner's ``cpu`` entry: matmul FLOP/s by GEMM size, memory
bandwidth, and gloo all-reduce bandwidth and latency, all with N local ranks running at once
(they share the cores, as the ranks of ``plait train`` do).

The fits are the cost model's own forms: achieved FLOP/s = peak x d / (d + half_dim) on a GEMM's
smallest dimension d, and all-reduce time = 2(n-1) x latency + 2(n-1)/n x bytes /
bandwidth (a line in bytes).
"""

from __future__ import annotations

import json
import os
import statistics
import time

GEMM_DIMS = (16, 32, 64, 128, 256, 512)
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
    import torch.distributed as dist

    fn()
    dist.barrier()
    calls, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < window_s:
        fn()
        calls += 1
    return calls * work / (time.perf_counter() - begin)


def _measure_rank() -> dict:
    """Runs on every rank at once: matmul and copy rates of this rank, all-reduce times of the group."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    rates = {}
    for d in GEMM_DIMS:
        a, b = torch.randn(1024, d), torch.randn(d, 1024)
        rates[d] = _sustained_rate(lambda: a @ b, 2 * 1024 * 1024 * d)
    src = torch.randn(8 * 2**20)
    dst = torch.empty_like(src)
    memory_rate = _sustained_rate(lambda: dst.copy_(src), 2 * src.numel() * 4)
    reduce_s = {}
    for nbytes in ALL_REDUCE_BYTES:
        buf = torch.zeros(nbytes // 4)
        dist.barrier()
        reduce_s[nbytes] = _timed(lambda: dist.all_reduce(buf), 5)
    return {"rates": rates, "memory_bytes_per_s": memory_rate, "reduce_s": reduce_s, "world": world}


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
    return {
        "ranks": world,
        "cores": os.cpu_count() or world,
        "matmul_flops": peak,
        "gemm_half_dim": half_dim,
        "memory_bytes_per_s": statistics.fmean(r["memory_bytes_per_s"] for r in results),
        "memory_bytes": pages / world,
        "link_bytes_per_s": (steps / world) / per_byte if per_byte > 0 else 1e9,
        "link_latency_s": max(fixed / steps, 1e-6),
        "measured_gemm_flops": {str(d): mean_rate[d] for d in GEMM_DIMS},
        "measured_all_reduce_s": {str(n): t for n, t in zip(ALL_REDUCE_BYTES, times)},
    }


def calibrate(ranks: int) -> dict:
    """Measure with ``ranks`` local gloo ranks; returns the profile."""
    from plait.launch import spawn

    return fit_profile(spawn(_measure_rank, ranks))


def calibrate_command(path: str, ranks: int) -> str:
    """``plait plan --cluster.gpu cpu --calibrate``: measure, write the profile, print a summary;
    returns the profile's path."""
    from plait.plan.hardware import default_profile_path

    path = path or default_profile_path()
    profile = calibrate(ranks)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(profile, fh, indent=1)
    print(f"calibrated {ranks} local ranks: matmul {profile['matmul_flops'] / 1e9:.1f} GFLOP/s per rank "
          f"(half at d = {profile['gemm_half_dim']:.0f}), memory {profile['memory_bytes_per_s'] / 1e9:.1f} GB/s, "
          f"gloo {profile['link_bytes_per_s'] / 1e9:.2f} GB/s with {profile['link_latency_s'] * 1e6:.0f} us latency "
          f"-> {path}")
    return path
