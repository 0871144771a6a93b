"""Fault handling under torchrun: torchrun's elastic agent restarts the workers (with
``--max-restarts``); plait adds what it lacks. torchrun sees a worker process exit, but not
a rank that hangs or freezes: the others then wait out the process-group timeout (30 min on
gloo, 10 on NCCL). So, under torchrun with ``resilience.watch``:

- every rank's watchdog beats into torchrun's own store (MASTER_ADDR:MASTER_PORT, keys under
  ``plait/<restart>/``), exactly as under plait's local supervisor;
- global rank 0 starts the monitor as a process of its own session (it outlives rank 0 and
  keeps running if rank 0 freezes). On a fatal fault it writes the event naming the culprit,
  kills the culprit ranks that run on its host, and sets ``abort`` in the store; every rank's
  watchdog sees that within one heartbeat and ends its process. A heartbeat is only a claim
  (anyone who reaches the store can write one), so the monitor signals a pid only when the
  process is this job's rank: its environment, set by torchrun, carries the heartbeat's
  RANK and this job's MASTER_PORT. torchrun then restarts the workers, which resume from
  the last good checkpoint (``TORCHELASTIC_RESTART_COUNT`` > 0);
- crashes are torchrun's to see; the monitor names the culprit when it runs on its host.

    torchrun --nnodes N --nproc-per-node G --max-restarts 3 ... -m plait train job.toml
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta

import torch.distributed as dist

from plait.config import ResilienceConfig
from plait.resilience.events import log_event
from plait.resilience.health import HealthWriter
from plait.resilience.monitor import Monitor
from plait.resilience.watchdog import ATTEMPT_ENV, MONITOR_ENV, PREFIX_ENV

RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"
POLL_S = 0.1
ORPHAN_S = 120.0  # no heartbeat at all for this long: the job is gone, the monitor leaves


def torchrun_attempt() -> int:
    return int(os.environ.get(RESTART_ENV, "0"))


def join_torchrun(resilience: ResilienceConfig, run_dir: str) -> subprocess.Popen | None:
    """In a torchrun worker, before training: point the watchdog at torchrun's store under
    this restart's prefix, and on global rank 0 start the monitor process (returned)."""
    if not resilience.watch:
        return None
    restart = torchrun_attempt()
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    os.environ[MONITOR_ENV], os.environ[PREFIX_ENV] = address, f"plait/{restart}/"
    os.environ[ATTEMPT_ENV] = str(restart)
    if int(os.environ["RANK"]) != 0:
        return None
    settings = json.dumps(dataclasses.asdict(resilience))
    cmd = [sys.executable, "-m", "plait.resilience.agent", "--store", address, "--prefix", f"plait/{restart}/",
           "--world", os.environ["WORLD_SIZE"], "--run-dir", run_dir, "--settings", settings]
    return subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL)


def finish_torchrun(store, monitor: subprocess.Popen | None) -> None:
    """Rank 0 at the end of a clean run: tell the monitor the job is done."""
    if store is not None:
        store.set("done", "1")
    if monitor is not None:
        try:
            monitor.wait(timeout=10)
        except subprocess.TimeoutExpired:
            monitor.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _environment(pid: int) -> dict[str, str] | None:
    """The environment process ``pid`` started with, or None where it cannot be read (gone,
    another user's, no /proc)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def is_job_rank(pid: int, rank: int, master_port: str) -> bool:
    """True when process ``pid`` on this host is rank ``rank`` of the torchrun job whose store
    listens on ``master_port``: the only processes the monitor may kill. False when unsure."""
    env = _environment(pid)
    return env is not None and env.get("RANK") == str(rank) and env.get("MASTER_PORT") == str(master_port)


def _exitcodes(monitor: Monitor) -> list[int | None]:
    """What the monitor can know of exits: ranks on this host whose process is gone."""
    host = socket.gethostname()
    codes: list[int | None] = []
    for rank in range(monitor.nproc):
        beat = monitor.beats.get(rank)
        gone = beat is not None and beat.get("host") == host and not _alive(beat["pid"])
        codes.append(-signal.SIGKILL if gone else None)
    return codes


def watch(store, world: int, cfg: ResilienceConfig, run_dir: str, master_port: str) -> str:
    """The monitor loop: returns 'done', 'abort' (a fatal fault was handled) or 'orphan'.
    ``master_port``: the port of torchrun's store, which names this job's ranks."""
    monitor = Monitor(store, world, cfg)
    health = HealthWriter(run_dir, monitor, torchrun_attempt())  # the environment is rank 0's
    last_seen = time.time()
    while True:
        if store.check(["done"]):
            monitor.read()
            health.update([0] * world, force=True)  # rank 0 reported a clean end: every rank is done
            return "done"
        codes = _exitcodes(monitor)
        fault = monitor.check(codes)
        health.update(codes, fault)
        if monitor.beats:
            last_seen = max([last_seen] + [b["time"] for b in monitor.beats.values()])
        if time.time() - last_seen > ORPHAN_S:
            return "orphan"
        if fault is not None:
            culprit = fault.ranks[0] if fault.ranks else None
            pid = monitor.beats.get(culprit, {}).get("pid") if culprit is not None else None
            log_event(run_dir, fault.kind, rank=culprit, pid=pid, step=fault.step, detail=fault.detail,
                      ranks=fault.ranks, fatal=fault.fatal, agent="torchrun", **fault.extra)
            print(f"plait: {fault.kind} detected: rank(s) {fault.ranks or 'unknown'}: {fault.detail}", flush=True)
            if fault.fatal:
                _stop(store, monitor, fault.ranks, master_port)
                return "abort"
        time.sleep(POLL_S)


def _stop(store, monitor: Monitor, culprits: list[int], master_port: str) -> None:
    """Kill the culprits that run here (a frozen one cannot stop itself), then ask every rank
    to end its process; torchrun restarts them all. A pid that is not this job's rank is left
    alone: the heartbeat naming it is stale (the pid was reused) or forged."""
    host = socket.gethostname()
    for rank in culprits:
        beat = monitor.beats.get(rank, {})
        pid = beat.get("pid")
        if beat.get("host") == host and isinstance(pid, int) and pid > 0 and is_job_rank(pid, rank, master_port):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    store.set("abort", json.dumps({"ranks": culprits, "time": time.time()}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="plait's monitor for a torchrun job (started by rank 0)")
    parser.add_argument("--store", required=True, help="host:port of torchrun's store")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--settings", required=True, help="resilience config as JSON")
    args = parser.parse_args(argv)
    host, port = args.store.rsplit(":", 1)
    client = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=60))
    store = dist.PrefixStore(args.prefix, client)
    cfg = ResilienceConfig(**json.loads(args.settings))
    try:
        watch(store, args.world, cfg, args.run_dir, port)
    except Exception:  # torchrun's store is gone: the job is over
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
