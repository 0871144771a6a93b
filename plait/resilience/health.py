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


class HealthWriter:
    """Keeps ``ranks.json`` current for one attempt of a job watched by ``monitor``."""

    def __init__(self, run_dir: str, monitor, attempt: int):
        self.run_dir, self.monitor, self.attempt = run_dir, monitor, attempt
        self.verdicts: dict[int, tuple[str, str]] = {}  # rank -> (state, detail) from a fault
        self.stopped_by: list[int] | None = None  # the culprits, once the supervisor stops the ranks
        # The previous attempt's rows: until a rank beats again, its row keeps the verdict that
        # ended that attempt (a page polling once a second must not miss a short-lived "hung").
        before = read_health(run_dir) if attempt > 0 else None
        self.carried = {row.get("rank"): row for row in before.get("ranks", []) if isinstance(row, dict)} \
            if before and isinstance(before.get("attempt"), int) and before["attempt"] < attempt else {}
        self._written = 0.0

    def update(self, exitcodes: list[int | None], fault=None, force: bool = False) -> None:
        """After a monitor check: note ``fault`` (if any) and rewrite the file when due
        (``force``: now, as at the end of an attempt)."""
        if fault is not None and (fault.fatal or fault.kind == "slow"):  # a skipped NaN step passes
            state = _FAULT_STATE.get(fault.kind, "hung")
            for rank in fault.ranks or range(self.monitor.nproc):  # no culprit: a communication hang
                self.verdicts[rank] = (state, fault.detail)
        elif fault is None and not force and time.monotonic() - self._written < EVERY_S:
            return
        self._written = time.monotonic()
        try:
            with atomic_write(health_path(self.run_dir), "w", durable=False) as fh:
                json.dump(self.snapshot(exitcodes), fh)
        except OSError:  # a full disk must not stop the monitor
            pass

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
        if beat is None and ended.get("state") in ("hung", "crashed", "nan", "stopped"):
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
            row["state"], row["detail"] = self.verdicts[rank]
        if row["state"] in ("hung", "crashed", "nan"):
            return row
        if code == 0:  # finished: a slow verdict on the way is history (the event log keeps it)
            row["state"] = "done"
        elif code is not None and self.stopped_by is not None:
            row["state"], row["detail"] = "stopped", f"stopped after the fault on rank(s) {self.stopped_by}"
        elif code is not None:
            row["state"], row["detail"] = "crashed", f"exit code {code}"
        return row
