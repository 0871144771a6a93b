"""Rank processes on this machine: start them, wait for them, stop every one of them.

``spawn`` (tests, ``plait train`` without supervision) and the supervisor (``launch.supervisor``)
share these; nothing here knows about training.

No rank outlives its launcher: a rank arms Linux's parent-death signal (elsewhere a thread
watches its parent), and ``sigterm_as_interrupt`` makes SIGTERM (``timeout``, systemd,
``docker stop``, Slurm) stop the launcher like Ctrl-C, so it stops every rank on its way out.
The stores the ranks meet in listen on 127.0.0.1 only (``loopback_store``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from plait.errors import PlaitError
from plait.resilience.watchdog import monitor_store

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
PARENT_POLL_S = 1.0
STORE_TIMEOUT = timedelta(minutes=30)  # what init_process_group's env:// store waits on gloo


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


def loopback_store(port: int = 0, world: int | None = None, timeout: timedelta = STORE_TIMEOUT) -> dist.TCPStore:
    """A TCPStore server listening on 127.0.0.1 only (``port`` 0: a free one, see ``.port``).

    TCPStore's server listens on every interface whatever host it is given, and anyone who
    reaches it can read and set keys (abort a job, forge heartbeats). Handed a socket already
    bound to loopback, it listens on that one instead."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
        port = sock.getsockname()[1]
    except BaseException:
        sock.close()
        raise
    fd = sock.detach()  # the store owns the socket from here on
    try:
        return dist.TCPStore("127.0.0.1", port, world, is_master=True, timeout=timeout,
                             wait_for_workers=False, master_listen_fd=fd)
    except BaseException:
        os.close(fd)
        raise


def _set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies; False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(launcher_pid: int) -> None:
    while os.getppid() == launcher_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def end_with_launcher(launcher_pid: int) -> None:
    """End this rank process as soon as its launcher (``launcher_pid``, its parent) dies, however
    it dies (SIGKILL included): left alone, a rank would go on training and checkpointing into
    the run dir. SIGKILL, because a rank may be stopped or blocked in a collective. Linux sends
    the parent-death signal when the parent *thread* ends: ``start_ranks`` runs in the
    launcher's main thread."""
    if not _set_parent_death_signal(signal.SIGKILL):
        threading.Thread(target=_watch_parent, args=(launcher_pid,), name="plait-parent-watch", daemon=True).start()
    if os.getppid() != launcher_pid:  # the launcher died before the signal was armed
        os._exit(1)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises KeyboardInterrupt in the main thread: the launcher stops its
    ranks as on Ctrl-C and the CLI reports "plait: interrupted". Further SIGTERMs are ignored
    until then, so they cannot cut the stopping short (SIGKILL still ends the ranks: see
    ``end_with_launcher``). Does nothing outside the main thread, where Python cannot set it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _process_group_store(rank: int, world: int, port: int) -> dist.TCPStore:
    """The process group's store on 127.0.0.1:``port``: rank 0 serves it on loopback only."""
    if rank == 0:
        return loopback_store(port, world)
    return dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=STORE_TIMEOUT)


def _worker(rank: int, world: int, port: int, backend: str, fn: Callable, args: tuple, results,
            env: dict[str, str] | None = None, launcher_pid: int | None = None) -> None:
    if launcher_pid is not None:
        end_with_launcher(launcher_pid)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env or {}),
    )
    # N ranks share this machine's cores; without this each would start one thread per core.
    torch.set_num_threads(max(1, usable_cores() // world))
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, store=_process_group_store(rank, world, port))
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
    launcher = os.getpid()
    procs = [ctx.Process(target=_worker, args=(r, nproc, port, backend, fn, args, results, env, launcher), daemon=False)
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
