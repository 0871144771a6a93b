"""The supervisor: runs a multi-rank job on this machine under the monitor, and on a fault
stops every rank, names the culprit in events.jsonl and restarts from the last good
checkpoint (up to ``resilience.max_restarts`` times). With no spare node here, a restart
reuses the same slots (C4's isolation of a faulty node needs a spare one)."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from plait.checkpoint import store as ckpt
from plait.config import JobConfig
from plait.launch.ranks import RankFailed, collect_results, loopback_store, start_ranks, stop_ranks
from plait.resilience.events import log_event
from plait.resilience.health import HealthWriter
from plait.resilience.monitor import Fault, Monitor
from plait.resilience.watchdog import ATTEMPT_ENV, MONITOR_ENV

POLL_S = 0.1
USER_ERROR = 2  # a rank's exit code for a PlaitError (see plait.launch.ranks._worker)


class JobFailed(RuntimeError):
    """Faults kept happening after ``max_restarts`` restarts."""


def _with_resume(cfg: JobConfig, resume: bool) -> JobConfig:
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=resume))


class _FatalFault(Exception):
    """Raised inside the wait for results to stop it: the monitor named a fatal fault."""

    def __init__(self, fault: Fault):
        super().__init__(fault.detail)
        self.fault = fault


def run_once(fn, cfg: JobConfig, attempt: int, backend: str) -> tuple[list[Any] | None, Fault | None]:
    """One start of the job: (every rank's result, None) or (None, the fatal fault)."""

    nproc = cfg.parallel.nproc
    store = loopback_store()
    env = {MONITOR_ENV: f"127.0.0.1:{store.port}", ATTEMPT_ENV: str(attempt)}
    monitor = Monitor(store, nproc, cfg.resilience)
    health = HealthWriter(cfg.run.dir, monitor, attempt)
    procs, results = start_ranks(fn, nproc, (cfg,), backend, env)

    def check(codes: list[int | None]) -> None:
        if USER_ERROR in codes:  # bad input met inside a rank: restarting cannot help
            raise RankFailed(codes.index(USER_ERROR), USER_ERROR)
        fault = monitor.check(codes)
        health.update(codes, fault)
        if fault is None:
            return
        log_event(cfg.run.dir, fault.kind, rank=fault.ranks[0] if fault.ranks else None,
                  pid=procs[fault.ranks[0]].pid if fault.ranks else None, step=fault.step,
                  detail=fault.detail, ranks=fault.ranks, fatal=fault.fatal, **fault.extra)
        print(f"plait: {fault.kind} detected: rank(s) {fault.ranks or 'unknown'}: {fault.detail}", flush=True)
        if fault.fatal:
            raise _FatalFault(fault)

    culprits: list[int] | None = None
    try:
        return collect_results(procs, results, check, POLL_S), None
    except _FatalFault as stop:
        culprits = stop.fault.ranks
        return None, stop.fault
    finally:
        health.stop([proc.exitcode for proc in procs], culprits)  # ranks running now end by our hand
        stop_ranks(procs, graceful=False)
        health.update([proc.exitcode for proc in procs], force=True)  # each rank's end


def supervise(fn, cfg: JobConfig, backend: str) -> list[Any]:
    """Run ``fn(cfg)`` on ``cfg.parallel.nproc`` local ranks until it finishes, restarting
    after each fatal fault. Returns every rank's result."""

    for attempt in range(cfg.resilience.max_restarts + 1):
        started = time.time()
        outputs, fault = run_once(fn, cfg, attempt, backend)
        if fault is None:
            log_event(cfg.run.dir, "done", detail=f"attempt {attempt}, {time.time() - started:.1f} s")
            return outputs
        if attempt == cfg.resilience.max_restarts:
            break
        folder = ckpt.latest_good_checkpoint(cfg.run.dir)
        cfg = _with_resume(cfg, folder is not None)
        where = f"from {os.path.basename(folder)}" if folder else "from the start (no checkpoint yet)"
        log_event(cfg.run.dir, "restart", detail=f"attempt {attempt + 1} after {fault.kind} on rank(s) {fault.ranks}, {where}")
        print(f"plait: restarting {where}", flush=True)
    raise JobFailed(f"{fault.kind} on rank(s) {fault.ranks} persisted after {cfg.resilience.max_restarts} restarts: {fault.detail}")
