"""Measured pipeline bubble against theory, on a balanced pipeline (CPU, gloo).

Every stage holds the same number of identical residual MLP blocks (the first stage also
computes its input gradient, as the others do, so all stages cost the same), so the only
idle time the schedule itself causes is its fill and drain. Each configuration runs a few
warm-up steps and then several measured steps, all configurations in alternating rounds so
machine noise hits each alike. One torch thread per rank.

    .venv/bin/python bench/bubble.py [--p 2] [--micro 4 8] [--rows 256] [--ffn 4096] [--steps 8] [--pin]
                                     [--out runs/bench_bubble]

Columns (medians over the measured steps):
  theory    ``theory_bubble``: (p-1)/(m+p-1) for gpipe and 1f1b, (p-1)/(v*m+p-1) for
            interleaved_1f1b; "issue" is the issue's literal form (p-1)/(m+p-1)/v.
  measured  ``step_bubble``: mean over ranks of idle / window, window = first compute start to
            last compute end over all ranks (wall clock, perf_counter).
  replay    the same step re-timed with its measured compute durations and free communication
            (``replay``): what uneven compute speed alone gives; measured - replay is what
            communication, Python and OS scheduling added.
  balanced  the same re-timing with every F (B) set to the mean F (B): the schedule's own bubble
            for a perfectly balanced model; it equals theory when the timeline records the
            schedule faithfully.
A Gantt PNG of the median step of every configuration is written to --out.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from plait.launch import spawn
from plait.parallel.pipeline import SCHEDULES
from plait.telemetry.timeline import (
    PipelineTimeline, plot_gantt, rank_bubbles, replay, step_bubble, step_window, theory_bubble,
    theory_bubble_issue,
)


class Block(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.up = nn.Linear(hidden, ffn)
        self.down = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class Chunk(nn.Module):
    """``n`` identical blocks. On the first stage the input is made a leaf that requires grad,
    so its backward computes the input gradient too and costs what every other stage's does."""

    def __init__(self, n: int, hidden: int, ffn: int, first: bool):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(hidden, ffn) for _ in range(n)])
        self.first = first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = x.detach().requires_grad_()
        return self.blocks(x)


def square_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).mean()


def physical_cpus() -> list[int]:
    """One logical CPU per physical core (the lowest-numbered hyperthread of each), from
    Linux's sysfs topology; every allowed CPU when the topology cannot be read."""
    allowed = sorted(os.sched_getaffinity(0))
    first: dict[tuple[str, str], int] = {}
    try:
        for cpu in allowed:
            topo = f"/sys/devices/system/cpu/cpu{cpu}/topology"
            with open(f"{topo}/physical_package_id") as fh, open(f"{topo}/core_id") as gh:
                first.setdefault((fh.read().strip(), gh.read().strip()), cpu)
    except OSError:
        return allowed
    return sorted(first.values())


def run_rank(configs: list[tuple[str, int, int]], hidden: int, ffn: int, rows: int, blocks: int,
             warmup: int, steps: int, pin: bool = False) -> list[dict]:
    """Inside a spawned rank: build every configuration, then run them in alternating rounds
    (one step of each per round) so that machine noise hits all of them alike. Returns, on
    rank 0, one measurement dict per configuration (None elsewhere). ``pin``: run on a
    physical core of its own (two hyperthreads of one core run each other's work slower)."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining import schedules as pp_schedules

    torch.set_num_threads(1)
    rank, p = dist.get_rank(), dist.get_world_size()
    if pin:
        cores = physical_cpus()
        os.sched_setaffinity(0, {cores[(rank + 1) % len(cores)]})  # core 0 left to the OS and the parent
    device = torch.device("cpu")
    runs = []
    for schedule, m, v in configs:
        n_stages = p * v
        ids = [rank + i * p for i in range(v)]
        torch.manual_seed(0)
        modules = [Chunk(blocks // n_stages, hidden, ffn, first=(i == 0)) for i in ids]
        stages = [PipelineStage(mod, i, n_stages, device) for mod, i in zip(modules, ids)]
        cls = getattr(pp_schedules, SCHEDULES[schedule])
        sched = cls(stages if v > 1 else stages[0], n_microbatches=m, loss_fn=square_loss, scale_grads=False)
        gen = torch.Generator().manual_seed(1)
        runs.append({
            "modules": modules, "schedule": sched, "timeline": PipelineTimeline().attach(stages, sched),
            "x": torch.randn(m * rows, hidden, generator=gen), "y": torch.zeros(m * rows, hidden),
            "first": 0 in ids, "last": n_stages - 1 in ids, "measured": [], "local": [],
        })
    for step in range(warmup + steps):
        for run in runs:
            for mod in run["modules"]:
                mod.zero_grad(set_to_none=True)
            timeline = run["timeline"]
            dist.barrier()
            timeline.step_begin()
            run["schedule"].step(*((run["x"],) if run["first"] else ()), target=run["y"] if run["last"] else None,
                                 losses=[] if run["last"] else None)
            mine = timeline.step_end()
            ranks = timeline.gather()
            if step >= warmup:
                run["measured"].append((step_bubble(ranks), ranks))
                run["local"].append(mine["bubble"])
    dist.barrier()
    if rank != 0:
        return [None] * len(runs)
    results = []
    for (schedule, m, v), run in zip(configs, runs):
        measured = run["measured"]
        order = sorted(range(len(measured)), key=lambda i: measured[i][0])
        median_ranks = measured[order[len(order) // 2]][1]
        durations = {k: [e - s for t in median_ranks for kk, _, _, s, e in t["intervals"] if kk == k] for k in "FB"}
        first, last = step_window(median_ranks)
        bubbles = [b for b, _ in measured]
        results.append({
            "schedule": schedule, "p": p, "m": m, "v": v,
            "bubble": statistics.median(bubbles), "min": min(bubbles), "max": max(bubbles),
            "replay": statistics.median(step_bubble(replay(r)) for _, r in measured),
            "balanced": statistics.median(step_bubble(replay(r, balanced=True)) for _, r in measured),
            "rank_bubbles": rank_bubbles(median_ranks),
            "local_rank0": statistics.median(run["local"]),
            "f_ms": 1e3 * statistics.median(durations["F"]), "b_ms": 1e3 * statistics.median(durations["B"]),
            "window_ms": 1e3 * (last - first),
            "timelines": median_ranks,
        })
    return results


def _machine_busy_s() -> float:
    """CPU seconds all processes of this machine have been busy (Linux /proc/stat)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and its finished children (the ranks)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=int, nargs="+", default=[2], help="pipeline degrees (ranks) to run")
    parser.add_argument("--micro", type=int, nargs="+", default=[4, 8], help="micro-batches per step")
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b", "interleaved_1f1b"])
    parser.add_argument("--v", type=int, default=2, help="stages per rank for interleaved_1f1b")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=4096, help="inner width of each block")
    parser.add_argument("--rows", type=int, default=256, help="rows (tokens) per micro-batch")
    parser.add_argument("--blocks", type=int, default=8, help="blocks in the whole model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="measured steps per configuration")
    parser.add_argument("--out", default=os.path.join("runs", "bench_bubble"), help="folder for the Gantt PNGs")
    parser.add_argument("--pin", action="store_true", help="pin each rank to a physical core of its own")
    args = parser.parse_args()
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), flush=True)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, 1 torch thread per rank, gloo; "
          f"model {args.blocks} blocks of hidden {args.hidden} (ffn {args.ffn}), "
          f"{args.rows} rows per micro-batch; median of {args.steps} steps after {args.warmup} warm-up"
          + (f"; ranks pinned to physical cores {physical_cpus()[1:max(args.p) + 1]}" if args.pin else ""), flush=True)
    print("load average (1, 5, 15 min) at start: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    os.makedirs(args.out, exist_ok=True)
    header = (f"{'schedule':<17} {'p':>2} {'m':>2} {'v':>2} {'F ms':>5} {'B ms':>5} {'theory':>6} "
              f"{'measured':>8} {'ratio':>5} {'min..max':>12} {'replay':>6} {'balanced':>8} "
              f"{'issue':>6} {'ratio':>5}  per-rank idle")
    started = time.perf_counter()
    for p in args.p:
        configs = []
        for schedule in args.schedules:
            v = args.v if schedule in ("interleaved_1f1b", "looped_bfs") else 1
            if args.blocks % (p * v):
                raise SystemExit(f"--blocks {args.blocks} is not a multiple of p*v = {p * v}")
            configs += [(schedule, m, v) for m in args.micro]
        busy0, ours0, wall0 = _machine_busy_s(), _own_cpu_s(), time.perf_counter()
        results = spawn(run_rank, p, (configs, args.hidden, args.ffn, args.rows, args.blocks, args.warmup, args.steps,
                                      args.pin))[0]
        others = (_machine_busy_s() - busy0 - (_own_cpu_s() - ours0)) / (time.perf_counter() - wall0)
        print(f"p = {p}: other processes on the machine used about {max(0.0, others):.2f} of "
              f"{os.cpu_count()} cores during the run")
        print(header)
        for r in results:
            theory = theory_bubble(r["schedule"], r["p"], r["m"], r["v"])
            issue = theory_bubble_issue(r["schedule"], r["p"], r["m"], r["v"])
            per_rank = " ".join(f"{b:.3f}" for b in r["rank_bubbles"])
            print(f"{r['schedule']:<17} {r['p']:>2} {r['m']:>2} {r['v']:>2} {r['f_ms']:>5.1f} {r['b_ms']:>5.1f} "
                  f"{theory:>6.3f} {r['bubble']:>8.3f} {r['bubble'] / theory:>5.2f} {r['min']:>5.3f}..{r['max']:<5.3f} "
                  f"{r['replay']:>6.3f} {r['balanced']:>8.3f} {issue:>6.3f} {r['bubble'] / issue:>5.2f}  {per_rank}",
                  flush=True)
            name = f"gantt_p{r['p']}_{r['schedule']}_m{r['m']}" + (f"_v{r['v']}" if r["v"] > 1 else "") + ".png"
            plot_gantt(r["timelines"], os.path.join(args.out, name),
                       f"{r['schedule']}, p={r['p']}, m={r['m']}" + (f", v={r['v']}" if r["v"] > 1 else ""))
    print("load average (1, 5, 15 min) at end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"Gantt charts in {args.out}/ ; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
