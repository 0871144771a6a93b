"""Fault injection (``resilience.inject``) for tests and demos.

``kind:key=value:...`` with kind one of:
- ``crash:rank=R:step=S``: rank R kills itself with SIGKILL at the start of step S;
- ``hang:rank=R:step=S``: rank R sleeps forever at the start of step S, outside any
  collective (its heartbeat goes on; the others wait for it in their next collective);
- ``hang_collective:rank=R:step=S``: rank R enters a barrier no other rank joins;
- ``slow:rank=R:factor=F[:step=S]``: from step S (default 1) rank R's compute takes F times
  as long;
- ``nan:rank=R:step=S``: rank R's loss at step S is NaN;
- ``crash_sync:rank=R:step=S``: rank R kills itself while the lowbw outer sync launched after
  step S is in flight (the other workers are inside the exchange);
- ``crash_save:rank=R:step=S``: rank R kills itself with SIGKILL in the middle of the
  checkpoint save of step S, once its DCP shards are written and before its state file and
  the all-rank agreement (with ``checkpoint.async`` inside the background write): the
  checkpoint must not be published, and ``latest`` stays on the previous one.
Injections fire only in a job's first attempt, so a restart runs clean. Each one is noted in
``<run.dir>/injections.jsonl`` (time, kind, rank, step) just before it fires, so tests and
bench/faults.py can measure detection latency.
"""

from __future__ import annotations

import json
import os
import signal
import time
import torch.distributed as dist

from plait.config.injection import INJECTIONS, Injection, parse_injection  # noqa: F401 (re-exported)


class Injector:
    """Fires ``injection`` on this rank at the right step (first attempt only)."""

    def __init__(self, injection: Injection | None, rank: int, attempt: int, run_dir: str = ""):
        self.run_dir = run_dir
        active = injection is not None and injection.rank == rank and attempt == 0
        self.injection = injection if active else None
        # A group only the culprit will ever use: creating it is collective, so every rank does.
        wanted = injection is not None and injection.kind == "hang_collective" and dist.is_initialized()
        self.stray_group = dist.new_group() if wanted else None

    def _note(self, step: int) -> None:
        if self.run_dir:
            record = {"time": time.time(), "kind": self.injection.kind, "rank": self.injection.rank, "step": step}
            with open(os.path.join(self.run_dir, "injections.jsonl"), "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def at_step_start(self, step: int) -> None:
        inj = self.injection
        if inj is None or step != inj.step or inj.kind not in ("crash", "hang", "hang_collective"):
            return
        self._note(step)
        if inj.kind == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        if inj.kind == "hang":
            while True:
                time.sleep(3600)
        if inj.kind == "hang_collective":
            dist.barrier(group=self.stray_group)

    def in_sync(self, step: int) -> None:
        """Called by the lowbw outer loop right after it launched an exchange."""
        inj = self.injection
        if inj is not None and inj.kind == "crash_sync" and step == inj.step:
            self._note(step)
            os.kill(os.getpid(), signal.SIGKILL)

    def during_save(self, step: int):
        """The callback a checkpoint save of ``step`` runs once this rank's shards are written
        (``crash_save``), or None."""
        inj = self.injection
        if inj is None or inj.kind != "crash_save" or step != inj.step:
            return None

        def crash() -> None:
            self._note(step)
            os.kill(os.getpid(), signal.SIGKILL)
        return crash

    def slow_down(self, step: int, compute_s: float) -> None:
        """Sleep so this step's compute took ``factor`` times ``compute_s``."""
        inj = self.injection
        if inj is not None and inj.kind == "slow" and step >= inj.step:
            if step == inj.step:
                self._note(step)
            time.sleep((inj.factor - 1.0) * compute_s)

    def poisons_loss(self, step: int) -> bool:
        inj = self.injection
        poisoned = inj is not None and inj.kind == "nan" and step == inj.step
        if poisoned:
            self._note(step)
        return poisoned
