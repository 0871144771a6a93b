"""``<run.dir>/ranks.json``: every rank's health as the monitor sees it, rewritten while it watches.

The live page (plait/watch) reads this file; it is written by the process that runs the monitor
(plait's supervisor, or the torchrun monitor), never by a rank, so a frozen rank 0 does not
freeze it. One row per rank: its step, phase, heartbeat age, last step time, the collective it
waits in, and a state taken from the monitor's own verdicts:

- ``starting``: no heartbeat yet (after a restart the row keeps the previous attempt's verdict
  until the rank beats again);
- ``healthy``, or ``restarted`` when it runs healthily in a restarted attempt;
- ``slow``: the monitor reported it slow;
- ``hung``, ``crashed``, ``nan``: named by the fatal fault of this attempt (a hang, a process
  exit, a non-finite loss), or, for ``crashed``, its process exited with an error;
- ``stopped``: ended by the supervisor because of a fault elsewhere;
- ``done``: its process ended cleanly.

A verdict is written at once; otherwise the file is rewritten at most every ``EVERY_S``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from plait.checkpoint.atomic import atomic_write

HEALTH_FILE = "ranks.json"
EVERY_S = 0.5
STATES = ("starting", "healthy", "restarted", "slow", "hung", "crashed", "nan", "stopped", "done")
_FAULT_STATE = {"hang": "hung", "crash": "crashed", "nan": "nan", "slow": "slow"}


def health_path(run_dir: str) -> str:
    return os.path.join(run_dir, HEALTH_FILE)


def read_health(run_dir: str) -> dict[str, Any] | None:
    """The last health written for ``run_dir``, or None when there is none (or it is unreadable)."""
    try:
        with open(health_path(run_dir)) as fh:
            health = json.load(fh)
    except (OSError, ValueError):
        return None
    return health if isinstance(health, dict) else None


def forget_health(run_dir: str) -> None:
    """Remove a previous run's ``ranks.json`` (a new run starts with no rows, or its own)."""
    try:
        os.remove(health_path(run_dir))
    except FileNotFoundError:
        pass


class HealthWriter:
    """Keeps ``ranks.json`` current for one attempt of a job watched by ``monitor``. It never
    raises: the page is a view, and the monitor must go on whatever happens to the file."""

    def __init__(self, run_dir: str, monitor, attempt: int):
        self.run_dir, self.monitor, self.attempt = run_dir, monitor, attempt
        self.verdicts: dict[int, tuple[str, str, bool]] = {}  # rank -> (state, detail, fatal) from a fault
        self.stopped: dict[int, str] = {}  # rank -> why the supervisor ended it
        self._written = 0.0
        self._failed = False
        # The previous attempt's rows: until a rank beats again, its row keeps the verdict that
        # ended that attempt (a page polling once a second must not miss a short-lived "hung").
        before = read_health(run_dir) if attempt > 0 else None
        rows = before.get("ranks") if before and isinstance(before.get("attempt"), int) and before["attempt"] < attempt else None
        self.carried = {row.get("rank"): row for row in rows if isinstance(row, dict)} if isinstance(rows, list) else {}

    def stop(self, before: list[int | None], culprits: list[int] | None) -> None:
        """The supervisor is ending the attempt: ranks still running then (``before``: exit
        codes just before it stopped them) are written as stopped, not as crashed."""
        why = f"stopped by the supervisor after the fault on rank(s) {culprits}" if culprits else \
            "stopped by the supervisor (the job was interrupted, or another rank failed)"
        self.stopped = {rank: why for rank, code in enumerate(before) if code is None}

    def update(self, exitcodes: list[int | None], fault=None, force: bool = False) -> None:
        """After a monitor check: note ``fault`` (if any) and rewrite the file when due
        (``force``: now, as at the end of an attempt)."""
        if fault is not None and (fault.fatal or fault.kind == "slow"):  # a skipped NaN step passes
            state = _FAULT_STATE.get(fault.kind, "hung")
            for rank in fault.ranks or range(self.monitor.nproc):  # no culprit: a communication hang
                self.verdicts[rank] = (state, fault.detail, fault.fatal)
        elif fault is None and not force and time.monotonic() - self._written < EVERY_S:
            return
        self._written = time.monotonic()
        try:
            with atomic_write(health_path(self.run_dir), "w", durable=False) as fh:
                json.dump(self.snapshot(exitcodes), fh)
        except Exception as exc:  # a full disk, an odd heartbeat: the monitor goes on
            if not self._failed:
                self._failed = True
                print(f"plait: monitor: cannot write {HEALTH_FILE} ({exc}); the live page's rank rows stop "
                      "updating", file=sys.stderr, flush=True)

    def snapshot(self, exitcodes: list[int | None]) -> dict[str, Any]:
        now = time.time()
        return {"time": now, "attempt": self.attempt, "nproc": self.monitor.nproc,
                "hang_bound_s": self.monitor.hang_bound(), "stale_s": self.monitor.stale_s(),
                "ranks": [self._row(rank, exitcodes[rank] if rank < len(exitcodes) else None, now)
                          for rank in range(self.monitor.nproc)]}

    def _row(self, rank: int, code: int | None, now: float) -> dict[str, Any]:
        beat = self.monitor.beats.get(rank)
        row: dict[str, Any] = {"rank": rank, "state": "starting", "detail": "", "exit_code": code}
        ended = self.carried.get(rank, {})
        if beat is None and ended.get("state") in ("hung", "crashed", "nan", "stopped", "slow"):
            row.update(state=ended["state"], detail=f"{ended.get('detail', '')}; restarting (attempt {self.attempt})")
        if beat is not None:
            collective = beat.get("collective")
            row.update(pid=beat["pid"], host=beat["host"], step=beat["step"], phase=beat["phase"],
                       heartbeat_age_s=max(0.0, now - beat["time"]),
                       step_s=beat["step_s"][-1] if beat["step_s"] else None,
                       compute_s=beat["compute_s"][-1] if beat["compute_s"] else None,
                       collective=f"{collective['op']} on {collective['dim']}" if collective else None,
                       state="restarted" if self.attempt > 0 else "healthy")
        if rank in self.verdicts:
            row["state"], row["detail"], fatal = self.verdicts[rank]
            # A fatal verdict stands; a slow rank's that did not end the job, while it runs.
            if fatal or code is None:
                return row
        if code == 0:
            row["state"], row["detail"] = "done", ""
        elif code is not None and rank in self.stopped:
            row["state"], row["detail"] = "stopped", self.stopped[rank]
        elif code is not None:
            row["state"], row["detail"] = "crashed", f"exit code {code}"
        return row
