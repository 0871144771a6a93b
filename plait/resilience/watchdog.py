"""The per-rank watchdog: a daemon thread that publishes this rank's heartbeat and progress to
the monitor's store every ``resilience.heartbeat_s`` seconds.

A heartbeat is one small JSON value under ``hb/<rank>``: the rank, time, pid, host, step and phase
(data, forward, backward, optimizer, checkpoint, eval), the collective the host is blocked in
(from the counted-collectives layer: op, mesh dim, sequence number, start time), and the
compute seconds of the last steps (step time minus time blocked in collectives), from which
the monitor spots slow ranks (plait/resilience/records.py checks each key). A frozen process
stops beating (the monitor then asks the OS, by this pid, whether it is frozen or only
starved); a rank that hangs elsewhere beats but makes no progress while the others wait in
a collective it never enters.

The trainer updates ``PROGRESS`` with plain attribute writes (nanoseconds); the thread reads
them. The store is a TCPStore client of the supervisor's server, found through
PLAIT_MONITOR_ADDR (host:port); without it nothing runs.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

from plait.telemetry import collectives as comm

MONITOR_ENV = "PLAIT_MONITOR_ADDR"
ATTEMPT_ENV = "PLAIT_ATTEMPT"
PREFIX_ENV = "PLAIT_MONITOR_PREFIX"  # under torchrun: this restart's keys in torchrun's store
ABORT_EXIT = 75  # a rank ended by the monitor's abort (plait/resilience/agent.py)


@dataclass
class Progress:
    step: int = 0
    phase: str = "start"
    compute_s: list[float] = field(default_factory=list)  # per finished step, last few
    step_s: list[float] = field(default_factory=list)  # wall time per finished step, last few
    nan_step: int | None = None  # first step this rank's own loss (or gradient) was not finite
    stage: int = 0  # its pipeline stage: only ranks of one stage do the same work per step

    def reset(self) -> None:
        """A new training run in this process starts from scratch."""
        self.__init__()

    def finish_step(self, step_s: float, compute_s: float) -> None:
        self.compute_s = (self.compute_s + [compute_s])[-16:]
        self.step_s = (self.step_s + [step_s])[-16:]


PROGRESS = Progress()


def monitor_store(timeout_s: float = 30.0) -> dist.TCPStore | None:
    """A client of the supervisor's store, or None when no supervisor watches this job."""
    address = os.environ.get(MONITOR_ENV)
    if not address:
        return None
    host, port = address.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s))
    prefix = os.environ.get(PREFIX_ENV)
    return dist.PrefixStore(prefix, store) if prefix else store


def attempt() -> int:
    """Which start of the job this is (0 first, then 1 per restart)."""
    return int(os.environ.get(ATTEMPT_ENV, "0"))


class Watchdog(threading.Thread):
    def __init__(self, store: dist.TCPStore, rank: int, interval_s: float):
        super().__init__(name="plait-watchdog", daemon=True)
        self.store, self.rank, self.interval_s = store, rank, interval_s
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._stop_event = threading.Event()

    def beat(self) -> None:
        blocked = comm.in_flight()
        collective = None
        if blocked:
            first = blocked[0]
            collective = {"op": first.op, "dim": first.dim, "seq": first.seq, "since": first.start}
        p = PROGRESS
        value = {
            "rank": self.rank, "time": time.time(), "mono": time.perf_counter(), "pid": self.pid, "host": self.host,
            "step": p.step, "phase": p.phase, "collective": collective, "compute_s": p.compute_s[-8:], "step_s": p.step_s[-8:],
            "nan_step": p.nan_step, "stage": p.stage,
        }
        self.store.set(f"hb/{self.rank}", json.dumps(value))

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.beat()
                aborted = self.store.check(["abort"])
            except Exception:  # the supervisor went away: nothing left to report to
                return
            if aborted:  # the torchrun monitor stops the job: end now, even mid-collective
                print(f"plait: rank {self.rank}: stopped by the monitor (fault elsewhere); torchrun restarts the job",
                      file=sys.stderr, flush=True)
                os._exit(ABORT_EXIT)
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
