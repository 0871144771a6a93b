"""What the operating system says about a rank's process, so that the monitor tells a frozen
process from a starved or busy one.

A heartbeat goes stale when the rank's watchdog thread does not run: the process is stopped
(SIGSTOP), or the interpreter is stuck, but also when the machine has more runnable processes
than cores, or the main thread holds the interpreter lock in a long C call (a checkpoint
save). Linux tells these apart in ``/proc/<pid>/stat``: the state letter (R runnable, S
sleeping, D waiting on disk, T stopped, t traced, Z zombie, X dead) and the CPU time the
process has used (utime + stime, in clock ticks). A process that is runnable, or whose CPU
time advances, is working; one that is stopped or dead is frozen; one that sleeps without
using any CPU time is stuck once that has lasted longer than the job's own pauses explain.

A rank can also look slow because it waited for a CPU: ``/proc/<pid>/schedstat`` counts the
seconds its main thread (the one that computes) spent runnable on a run queue; compute time
that such waiting explains does not make the rank a straggler.

Where ``/proc`` does not exist (macOS, Windows) or the rank runs on another host, nothing is
known (``UNKNOWN``) and the monitor keeps judging by the heartbeat's age alone.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

UNKNOWN = "unknown"  # no /proc here, or not this host's process
GONE = "gone"  # no such process, a zombie, or dead
STOPPED = "stopped"  # SIGSTOP (T) or stopped by a debugger (t)
WORKING = "working"  # runnable, or its CPU time advanced since the last look
IDLE = "idle"  # sleeping (S, D, I) with no CPU time used since the last look

GONE_STATES = frozenset("ZXx")
STOPPED_STATES = frozenset("Tt")


@dataclass(frozen=True)
class ProcessSample:
    state: str  # the state letter of /proc/<pid>/stat
    cpu_ticks: int  # utime + stime of every thread of the process


def parse_stat(text: str) -> ProcessSample:
    """``/proc/<pid>/stat``: ``pid (comm) state ppid ...``; comm may hold spaces and
    parentheses, so the fields are counted from the last ')'."""
    fields = text[text.rindex(")") + 2:].split()
    # After comm: state is field 3 of proc(5), utime 14 and stime 15.
    return ProcessSample(state=fields[0], cpu_ticks=int(fields[11]) + int(fields[12]))


def read_proc_stat(pid: int, proc_root: str = "/proc") -> ProcessSample | str:
    """This host's view of ``pid``: its sample, ``GONE`` or ``UNKNOWN`` (no /proc)."""
    if not os.path.isdir(proc_root):
        return UNKNOWN
    try:
        with open(os.path.join(proc_root, str(pid), "stat")) as fh:
            return parse_stat(fh.read())
    except FileNotFoundError:
        return GONE
    except (OSError, ValueError, IndexError):  # unreadable (another user's process) or malformed
        return UNKNOWN


def read_run_wait(pid: int, proc_root: str = "/proc") -> float | None:
    """Seconds ``pid``'s main thread has waited on a run queue (None: not known)."""
    try:
        with open(os.path.join(proc_root, str(pid), "schedstat")) as fh:
            return int(fh.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


class ProcessWatch:
    """Samples processes on every look and remembers when each one's CPU time last advanced,
    and how its run-queue waiting grew."""

    HISTORY_S = 300.0  # run-queue samples kept per process

    def __init__(self, reader: Callable[[int], ProcessSample | str] = read_proc_stat,
                 clock: Callable[[], float] = time.time,
                 wait_reader: Callable[[int], float | None] = read_run_wait):
        self.reader, self.clock, self.wait_reader = reader, clock, wait_reader
        self._cpu: dict[int, tuple[int, float]] = {}  # pid -> (CPU ticks, when they last changed)
        self._waits: dict[int, list[tuple[float, float]]] = {}  # pid -> [(when, run-queue seconds)]

    def sample_wait(self, pid: int) -> None:
        """Note ``pid``'s run-queue seconds now (called on every check)."""
        waited = self.wait_reader(pid)
        if waited is None:
            return
        now = self.clock()
        history = [(t, w) for t, w in self._waits.get(pid, []) if t >= now - self.HISTORY_S]
        self._waits[pid] = history + [(now, waited)]

    def run_wait(self, pid: int, window_s: float) -> float:
        """Seconds ``pid`` waited for a CPU over about the last ``window_s`` seconds (0: not known)."""
        history = self._waits.get(pid, [])
        if not history:
            return 0.0
        now, latest = history[-1]
        start = next((w for t, w in history if t >= now - window_s), latest)
        return latest - start

    def look(self, pid: int) -> tuple[str, float]:
        """(one of UNKNOWN, GONE, STOPPED, WORKING, IDLE; seconds the process has used no CPU
        time, counted from the first look at it)."""
        sample = self.reader(pid)
        now = self.clock()
        if isinstance(sample, str):
            return sample, 0.0
        if sample.state in GONE_STATES:
            return GONE, 0.0
        if sample.state in STOPPED_STATES:
            return STOPPED, 0.0
        seen = self._cpu.get(pid)
        advanced = seen is not None and sample.cpu_ticks != seen[0]
        if seen is None or advanced:
            self._cpu[pid] = (sample.cpu_ticks, now)
        idle_s = now - self._cpu[pid][1]
        return (WORKING if sample.state == "R" or advanced else IDLE), idle_s
