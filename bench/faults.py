"""Fault detection on 4 local ranks: latency, culprit accuracy and steps lost per fault class,
against the same faults under plain torchrun with its default timeouts; and the watchdog's
cost on the step time.

Each trial trains a tiny model on 4 gloo ranks (checkpoint every ``--ckpt-every`` steps)
and injects one fault at a random step and rank: crash (SIGKILL), hang outside any collective,
hang inside a stray collective, SIGSTOP from outside the program, slow rank (3x compute), NaN
loss. The supervisor stops at the first fault (``max_restarts = 0``: restarts are exercised by
tests/parallel/test_resilience.py). Latency = fault event time − injection time (for SIGSTOP,
the time the signal was sent). Steps lost = steps since the last checkpoint, redone after a
restart.

Baseline: the same injection under ``torchrun --standalone`` with ``resilience.watch = false``,
waited on for at most ``--baseline-cap`` seconds; torchrun notices an exited rank, but a hang
only ends at the process-group timeout (30 min for gloo).

False alarms: healthy tp2 x pp2 jobs run back to back for ``--loaded-minutes`` while
``--load-factor`` busy-looping processes per core compete for the CPUs; every fault event
they get is a false alarm, reported per hour of that loaded training.

Overhead: the CPU time of one heartbeat (the watchdog's whole work) measured directly, and
the same job with and without the watchdog, alternating ``--overhead-rounds``
rounds; median step time of each, from metrics.jsonl.

    .venv/bin/python bench/faults.py [--trials 25] [--baseline-trials 3] [--baseline-cap 60] [--overhead-rounds 4]
        [--loaded-minutes 10] [--load-factor 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from plait.launch import launch_training  # noqa: E402
from plait.resilience.events import read_events  # noqa: E402
from plait.launch.supervisor import JobFailed  # noqa: E402
from tests.parallel.harness import job, write_corpus  # noqa: E402

CLASSES = ("crash", "hang", "hang_collective", "sigstop", "slow", "nan")
KIND = {"crash": "crash", "hang": "hang", "hang_collective": "hang", "sigstop": "hang", "slow": "slow", "nan": "nan"}
COMMON = {"parallel.nproc": 4, "model.n_layers": 2, "train.eval_every": 0, "train.sample_tokens": 0}
FAULT_KINDS = ("crash", "hang", "slow", "nan")
LOADED_LAYOUT = {"parallel.tp": 2, "parallel.pp": 2, "parallel.pp_schedule": "1f1b", "parallel.dp_shard": -1}


def settings(args, steps: int, **values) -> dict:
    return {**COMMON, "train.steps": steps, "checkpoint.every": args.ckpt_every, "resilience.max_restarts": 0,
            **values}


def metrics_steps(run_dir: str) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as fh:
        return sum('"loss"' in line for line in fh)


def trial(folder: str, args, cls: str, index: int, rng: random.Random) -> dict:
    name = f"{cls}_{index}"
    rank, step = rng.randrange(4), rng.randint(3, args.steps - 2)
    values = {"resilience.evict_slow": True, "resilience.slow_steps": 3} if cls == "slow" else {}
    if cls != "sigstop":
        spec = f"slow:rank={rank}:factor=3:step={step}" if cls == "slow" else f"{cls}:rank={rank}:step={step}"
        values["resilience.inject"] = spec
    cfg = job(folder, name, **settings(args, args.steps + 10 if cls == "slow" else args.steps, **values))
    run_dir = cfg.run.dir
    fault_time = None
    runner_error: list = []

    def run():
        try:
            launch_training(cfg)
        except JobFailed as exc:
            runner_error.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    if cls == "sigstop":
        while metrics_steps(run_dir) < step - 1 and thread.is_alive():
            time.sleep(0.02)
        pid = next(e["pid"] for e in read_events(run_dir) if e["kind"] == "start" and e["rank"] == rank)
        fault_time = time.time()
        os.kill(pid, signal.SIGSTOP)
    thread.join()
    if fault_time is None:
        with open(os.path.join(run_dir, "injections.jsonl")) as fh:
            fault_time = json.loads(fh.readline())["time"]
    faults = [e for e in read_events(run_dir) if e["kind"] == KIND[cls]]
    if not faults:
        return {"detected": False}
    fault = faults[0]
    done = step - 1  # steps finished when the fault hit, all redone since the last checkpoint
    right = fault.get("ranks") == [rank]
    if not right:  # keep the evidence: which rank was faulty, what the monitor said
        print(f"{name}: injected on rank {rank} at step {step}; reported {fault.get('ranks')}: {fault['detail']}",
              flush=True)
    return {"detected": True, "latency": fault["time"] - fault_time, "right": right,
            "lost": done - (done // args.ckpt_every) * args.ckpt_every}


def baseline(folder: str, args, cls: str, index: int) -> dict:
    """The fault under plain torchrun: seconds until the job ended (None: still running at the cap)."""
    name = f"torchrun_{cls}_{index}"
    step, rank = 4, 1
    overrides = {**COMMON, "train.steps": args.steps, "checkpoint.every": args.ckpt_every, "resilience.watch": False}
    if cls != "sigstop":
        kind = "slow" if cls == "slow" else cls
        overrides["resilience.inject"] = (f"slow:rank={rank}:factor=3:step={step}" if kind == "slow"
                                          else f"{kind}:rank={rank}:step={step}")
    cfg = job(folder, name, **overrides)
    flags = [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in {
        **overrides, "run.dir": cfg.run.dir, "data.source": cfg.data.source, "data.cache_dir": cfg.data.cache_dir,
        "data.tokenizer": cfg.data.tokenizer, "model.dim": cfg.model.dim, "model.n_heads": cfg.model.n_heads,
        "model.n_kv_heads": cfg.model.n_kv_heads, "model.ffn_dim": cfg.model.ffn_dim,
        "model.max_seq_len": cfg.model.max_seq_len, "train.seq_len": cfg.train.seq_len,
        "train.global_batch": cfg.train.global_batch, "train.micro_batch": cfg.train.micro_batch,
        "train.device": "cpu", "metrics.tensorboard": False, "metrics.plot": False, "metrics.progress": False,
    }.items()]
    command = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc-per-node", "4",
               "-m", "plait", "train", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    fault_time = None
    if cls == "sigstop":
        while metrics_steps(cfg.run.dir) < step and proc.poll() is None:
            time.sleep(0.02)
        pid = next(e["pid"] for e in read_events(cfg.run.dir) if e["kind"] == "start" and e["rank"] == rank)
        fault_time = time.time()
        os.kill(pid, signal.SIGSTOP)
    try:
        proc.wait(timeout=args.baseline_cap)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {"ended": None, "completed": False}
    if fault_time is None:
        path = os.path.join(cfg.run.dir, "injections.jsonl")
        fault_time = json.loads(open(path).readline())["time"] if os.path.isfile(path) else time.time()
    return {"ended": time.time() - fault_time, "completed": proc.returncode == 0}


def overhead(folder: str, args) -> tuple[float, float]:
    """Median step time (s) without and with the watchdog and monitor."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for index in range(args.overhead_rounds):
        for watch in (False, True):
            cfg = job(folder, f"overhead_{watch}_{index}", **{**COMMON, "train.steps": args.overhead_steps,
                                                             "checkpoint.every": 0, "resilience.watch": watch})
            launch_training(cfg)
            with open(os.path.join(cfg.run.dir, "metrics.jsonl")) as fh:
                rows = [json.loads(line) for line in fh if '"step_s"' in line]
            times[watch] += [r["step_s"] for r in rows if r["step"] > 2]
    return statistics.median(times[False]), statistics.median(times[True])


def false_alarms(folder: str, args) -> dict:
    """Healthy jobs back to back under load for ``--loaded-minutes``: their fault events,
    jobs, steps and hours of loaded training."""
    cores = os.cpu_count() or 1
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load_factor * cores)]
    alarms: list[dict] = []
    jobs = steps = 0
    begin = time.time()
    try:
        while time.time() - begin < args.loaded_minutes * 60:
            cfg = job(folder, f"loaded_{jobs}", **settings(args, args.steps, **LOADED_LAYOUT))
            try:
                launch_training(cfg)
            except JobFailed:
                pass  # max_restarts = 0: a false alarm ends the job; its event is counted below
            found = [e for e in read_events(cfg.run.dir) if e["kind"] in FAULT_KINDS]
            for event in found:
                print(f"false alarm in loaded_{jobs}: {event['kind']} rank(s) {event.get('ranks')}: {event['detail']}",
                      flush=True)
            alarms += found
            jobs += 1
            steps += metrics_steps(cfg.run.dir)
    finally:
        for proc in busy:
            proc.kill()
        for proc in busy:
            proc.wait()
    return {"alarms": len(alarms), "jobs": jobs, "steps": steps, "hours": (time.time() - begin) / 3600,
            "busy": len(busy), "cores": cores}


def beat_cost(beats: int = 2000) -> float:
    """Seconds of CPU one heartbeat costs (JSON of the progress, a store write, the abort
    check), measured in this process against a local store: the watchdog's whole work."""
    from datetime import timedelta

    import torch.distributed as dist

    from plait.resilience.watchdog import Watchdog

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=10))
    dog = Watchdog(client, 0, 0.5)
    for _ in range(50):
        dog.beat()
    begin = time.process_time()
    for _ in range(beats):
        dog.beat()
        client.check(["abort"])
    return (time.process_time() - begin) / beats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=25)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--ckpt-every", type=int, default=4)
    parser.add_argument("--baseline-trials", type=int, default=3)
    parser.add_argument("--baseline-cap", type=float, default=60.0)
    parser.add_argument("--overhead-rounds", type=int, default=4)
    parser.add_argument("--overhead-steps", type=int, default=20)
    parser.add_argument("--classes", default=",".join(CLASSES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loaded-minutes", type=float, default=10.0,
                        help="minutes of healthy training under load, for the false-alarm rate (0: skip)")
    parser.add_argument("--load-factor", type=int, default=3, help="busy-looping processes per core during it")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print("command:", "python " + " ".join(shlex.quote(a) for a in sys.argv), flush=True)
    rng = random.Random(args.seed)
    classes = [c for c in args.classes.split(",") if c]  # "": only the overhead and false alarms
    with tempfile.TemporaryDirectory() as folder:
        write_corpus(folder)
        rows = {}
        for cls in classes:
            results = [trial(folder, args, cls, i, rng) for i in range(args.trials)]
            base = [baseline(folder, args, cls, i) for i in range(args.baseline_trials)]
            rows[cls] = (results, base)
            print(f"{cls}: done", flush=True)
        plain, watched = overhead(folder, args) if args.overhead_rounds else (float("nan"), float("nan"))
        loaded = false_alarms(folder, args) if args.loaded_minutes else None
    print(f"\n4 ranks, {args.trials} injections per class at random steps and ranks; baseline: plain torchrun, "
          f"{args.baseline_trials} per class, cap {args.baseline_cap:.0f} s")
    print(f"{'fault':<16} {'detected':>9} {'culprit right':>14} {'latency median':>15} {'latency max':>12} "
          f"{'steps lost':>11} | {'torchrun: job ended after':>26}")
    for cls, (results, base) in rows.items():
        found = [r for r in results if r["detected"]]
        lat = [r["latency"] for r in found]
        right = sum(r["right"] for r in found)
        lost = statistics.mean(r["lost"] for r in found) if found else float("nan")
        ended = [b["ended"] for b in base]
        baseline_text = ("never (cap)" if all(e is None for e in ended)
                         else f"{statistics.median([e for e in ended if e is not None]):.1f} s, "
                              f"{sum(b['completed'] for b in base)}/{len(base)} completed")
        print(f"{cls:<16} {len(found):>4}/{len(results):<4} {100 * right / max(len(found), 1):>13.0f}% "
              f"{statistics.median(lat) if lat else float('nan'):>14.2f}s {max(lat) if lat else float('nan'):>11.2f}s "
              f"{lost:>11.1f} | {baseline_text:>26}")
    if loaded is not None:
        per_hour = loaded["alarms"] / max(loaded["hours"], 1e-9)
        print(f"\nfalse alarms under load ({loaded['busy']} busy processes on {loaded['cores']} cores, healthy tp2 x pp2 "
              f"jobs): {loaded['alarms']} in {loaded['hours'] * 60:.1f} min ({loaded['jobs']} jobs, {loaded['steps']} "
              f"steps) = {per_hour:.1f} per hour")
    print(f"\nwatchdog overhead: median step {plain * 1000:.1f} ms without, {watched * 1000:.1f} ms with "
          f"({100 * (watched / plain - 1):+.1f}%)")
    cost = beat_cost()
    print(f"watchdog cost: {cost * 1e6:.0f} us of CPU per heartbeat = {100 * cost / 0.5:.3f}% of one core "
          f"at resilience.heartbeat_s = 0.5")


if __name__ == "__main__":
    main()
