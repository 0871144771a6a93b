"""The step guard: everything that watches a training step for faults, or injects them, behind
one object so the step itself reads as training only.

It owns the fault injector (``resilience.inject``, tests and demos), the watchdog thread that
publishes this rank's heartbeat to the supervisor (``resilience.watch``), the ``PROGRESS``
bookkeeping the watchdog reads (step, phase, step and compute times, the first non-finite
step) and the non-finite policy (``resilience.on_nan``). The trainer tells it where the step
is; it never touches the loss arithmetic beyond returning a poisoned scale or total.
"""

from __future__ import annotations

import torch

from plait.config import JobConfig
from plait.errors import NonFiniteError
from plait.resilience.events import log_event
from plait.resilience.inject import Injector, parse_injection
from plait.resilience.watchdog import PROGRESS, Watchdog, attempt, monitor_store


class StepGuard:
    """Collective to build (the injector may create a process group). ``close`` at the end."""

    def __init__(self, cfg: JobConfig, rank: int, stage: int = 0):
        self.rank, self.on_nan = rank, cfg.resilience.on_nan
        PROGRESS.reset()
        PROGRESS.stage = stage  # the monitor compares a rank's pace with its own stage's only
        self.injector = Injector(parse_injection(cfg.resilience.inject), rank, attempt(), cfg.run.dir)
        store = monitor_store() if cfg.resilience.watch else None
        self.watchdog = Watchdog(store, rank, cfg.resilience.heartbeat_s) if store is not None else None
        if self.watchdog is not None:
            self.watchdog.start()
        self._poisoned = False
        log_event(cfg.run.dir, "start", rank=rank, detail=f"attempt {attempt()}")

    def begin_step(self, step: int) -> None:
        """A step starts (reading its data first); crash and hang injections fire here."""
        PROGRESS.step, PROGRESS.phase = step, "data"
        self.injector.at_step_start(step)

    @staticmethod
    def phase(name: str) -> None:
        """Where the step is, for the heartbeat: forward, backward, optimizer, sync, eval, checkpoint."""
        PROGRESS.phase = name

    def loss_scale(self, step: int, scale: float) -> float:
        """The step's gradient scale: NaN where a ``nan`` injection poisons this step."""
        self._poisoned = self.injector.poisons_loss(step)
        return float("nan") if self._poisoned else scale

    def loss_total(self, step: int, total: torch.Tensor, holds_loss: bool = True) -> torch.Tensor:
        """This rank's loss sum as the step reports it (NaN where poisoned, on ranks that
        compute a loss); notes the first step this rank's own loss was not finite."""
        if self._poisoned and holds_loss:
            total = total * float("nan")
        if not bool(torch.isfinite(total)) and PROGRESS.nan_step is None:
            PROGRESS.nan_step = step  # this rank's own loss: where the NaN/Inf appeared
        return total

    def non_finite(self, step: int) -> None:
        """A non-finite gradient norm: skip this step's update, or stop for a rollback to the
        last checkpoint (NonFiniteError, after a last heartbeat the monitor must see)."""
        if self.on_nan == "rollback":
            if self.watchdog is not None:
                self.watchdog.beat()
            raise NonFiniteError(f"non-finite loss or gradient at step {step}; rolling back to the last checkpoint")
        if self.rank == 0:
            print(f"plait: step {step}: non-finite gradient norm, update skipped (resilience.on_nan = 'skip')", flush=True)

    def slow_down(self, step: int, compute_s: float) -> None:
        """A ``slow`` injection stretches this step's compute (so far ``compute_s``)."""
        self.injector.slow_down(step, compute_s)

    @staticmethod
    def end_step(elapsed_s: float, compute_s: float) -> None:
        """The step's wall and compute seconds, from which the monitor spots slow ranks."""
        PROGRESS.finish_step(elapsed_s, compute_s)

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()

