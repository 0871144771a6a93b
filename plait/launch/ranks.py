"""Rank processes on this machine: start them, wait for them, stop every one of them.

``spawn`` (tests, ``plait train`` without supervision) and the supervisor (``launch.supervisor``)
share these; nothing here knows about training.
"""

from __future__ import annotations

import os
import queue
import socket
import sys
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from plait.errors import PlaitError
from plait.resilience.watchdog import monitor_store


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, Slurm's --cpus-per-task, a
    container's cpuset) where the platform reports one, else every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, backend: str, fn: Callable, args: tuple, results,
            env: dict[str, str] | None = None) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env or {}),
    )
    # N ranks share this machine's cores; without this each would start one thread per core.
    torch.set_num_threads(max(1, usable_cores() // world))
    try:
        dist.init_process_group(backend, rank=rank, world_size=world)
        out = fn(*args)
        results.put((rank, out))
    except PlaitError as exc:
        print(f"plait: error on rank {rank}: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except BaseException as exc:
        traceback.print_exc()
        sys.stderr.flush()
        _report_error(rank, exc)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _report_error(rank: int, exc: BaseException) -> None:
    """Tell the monitor (if one watches) why this rank is failing: it tells a rank's own error
    from a lost peer's."""
    try:
        store = monitor_store(timeout_s=2.0)
        if store is not None:
            store.set(f"error/{rank}", f"{type(exc).__name__}: {exc}"[:2000])
    except Exception:
        pass  # the supervisor is gone; the exit code still tells


class RankFailed(RuntimeError):
    """A spawned rank exited with a non-zero code; ``exitcode`` is the first failure's."""

    def __init__(self, rank: int, exitcode: int):
        super().__init__(f"rank {rank} exited with code {exitcode}; the other ranks were stopped")
        self.rank, self.exitcode = rank, exitcode


def start_ranks(fn: Callable, nproc: int, args: tuple, backend: str, env: dict[str, str] | None = None):
    """Start ``nproc`` rank processes running ``fn(*args)`` in one process group on 127.0.0.1
    (``env`` added to their environment); returns (processes, the queue their results come on)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, nproc, port, backend, fn, args, results, env), daemon=False)
             for r in range(nproc)]
    for proc in procs:
        proc.start()
    return procs, results


def collect_results(procs: list, results, check: Callable[[list[int | None]], None], poll_s: float = 0.2) -> list[Any]:
    """Wait for every rank's return value, in rank order. Between polls ``check(exit codes)``
    runs and may raise to stop waiting (a failed rank, a fault the monitor names)."""
    outputs: dict[int, Any] = {}
    while len(outputs) < len(procs):
        try:
            rank, out = results.get(timeout=poll_s)
            outputs[rank] = out
            continue
        except queue.Empty:
            pass
        codes = [proc.exitcode for proc in procs]
        check(codes)
        if all(code == 0 for code in codes):
            time.sleep(0.2)  # results may still be in flight in the queue's feeder thread
            while not results.empty():
                rank, out = results.get()
                outputs[rank] = out
            if len(outputs) < len(procs):
                raise RuntimeError("a rank exited without returning its result")
    for proc in procs:
        proc.join()
    return [outputs[r] for r in range(len(procs))]


def stop_ranks(procs: list, graceful: bool = True) -> None:
    """End every rank still alive and reap them all: SIGTERM first when ``graceful``, SIGKILL
    otherwise (SIGKILL also ends a stopped process) and for any rank that outlives the grace."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate() if graceful else proc.kill()
    for proc in procs:
        proc.join(timeout=5 if graceful else 10)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)


def raise_on_failure(codes: list[int | None]) -> None:
    """``collect_results``' check for plain spawns: the first rank that exited non-zero."""
    for rank, code in enumerate(codes):
        if code not in (None, 0):
            raise RankFailed(rank, code)


def spawn(fn: Callable, nproc: int, args: tuple = (), backend: str = "gloo") -> list[Any]:
    """Run ``fn(*args)`` on ``nproc`` local ranks joined in one process group (127.0.0.1).

    Returns the list of each rank's return value. If any rank fails, all are stopped and
    RankFailed is raised: no rank is left running.
    """
    procs, results = start_ranks(fn, nproc, args, backend)
    try:
        return collect_results(procs, results, raise_on_failure)
    finally:
        stop_ranks(procs)
