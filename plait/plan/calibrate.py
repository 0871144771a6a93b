"""Measure this machine for the planner's ``cpu`` entry: matmul FLOP/s by GEMM size, memory
bandwidth, and gloo all-reduce bandwidth and latency, all with N local ranks running at once
(they share the cores, as the ranks of ``plait train`` do).

The fits are the cost model's own forms: achieved FLOP/s = peak x d / (d + half_dim) on a GEMM's
smallest dimension d (a line in 1/d), and all-reduce time = 2(n-1) x latency + 2(n-1)/n x bytes /
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


def _measure_rank() -> dict:
    """Runs on every rank at once: matmul and copy rates of this rank, all-reduce times of the group."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    rates = {}
    for d in GEMM_DIMS:
        a, b = torch.randn(1024, d), torch.randn(d, 1024)
        dist.barrier()
        seconds = _timed(lambda: a @ b, 5)
        rates[d] = 2 * 1024 * 1024 * d / seconds
    src = torch.randn(8 * 2**20)
    dst = torch.empty_like(src)
    dist.barrier()
    copy_s = _timed(lambda: dst.copy_(src), 5)
    reduce_s = {}
    for nbytes in ALL_REDUCE_BYTES:
        buf = torch.zeros(nbytes // 4)
        dist.barrier()
        reduce_s[nbytes] = _timed(lambda: dist.all_reduce(buf), 5)
    return {"rates": rates, "memory_bytes_per_s": 2 * src.numel() * 4 / copy_s, "reduce_s": reduce_s, "world": world}


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def fit_profile(results: list[dict]) -> dict:
    """The profile (JSON-ready) from every rank's measurements."""
    world = results[0]["world"]
    mean_rate = {d: statistics.fmean(r["rates"][d] for r in results) for d in GEMM_DIMS}
    # 1/rate = 1/peak + (half_dim/peak) / d
    intercept, slope = _line([1 / d for d in GEMM_DIMS], [1 / mean_rate[d] for d in GEMM_DIMS])
    peak = 1 / intercept if intercept > 0 else max(mean_rate.values())
    half_dim = max(1.0, slope * peak)
    times = [statistics.fmean(r["reduce_s"][n] for r in results) for n in ALL_REDUCE_BYTES]
    fixed, per_byte = _line([float(n) for n in ALL_REDUCE_BYTES], times)
    steps = 2 * (world - 1)
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {
        "ranks": world,
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
