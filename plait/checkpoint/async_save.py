"""``checkpoint.async``: the save in flight, written by a background thread while training goes on.

The training thread waits for the save in flight, stages the next one (a CPU copy of this rank's
shards, :func:`.store.stage_checkpoint`, into buffers reused from save to save: :mod:`.staging`)
and hands it over; a background thread writes it with :func:`.store.write_checkpoint` exactly as
a synchronous save would (shards, per-rank state, the all-rank agreement, rank 0's manifest,
the rename and ``latest``), so a crash mid-save still leaves ``latest`` on the previous good
checkpoint. At most one save is in flight: the next one, and the end of training, wait for it.

The background thread's collectives run on a process group of their own, created on every
rank: gloo collectives from two threads on one group may interleave and deadlock, and an NCCL
job still needs a gloo group for the CPU copy.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from plait.checkpoint.staging import ReusedStaging
from plait.checkpoint.store import StagedSave, write_checkpoint
from plait.telemetry import collectives as comm

# Niceness of the writing thread (Linux schedules threads, so it applies to this thread alone):
# where cores are shared with training, the write takes the time training leaves idle instead
# of slowing the step. It still finishes well within a checkpoint interval.
WRITER_NICE = 10


class BackgroundSaver:
    """Writes one staged save at a time in a background thread; collective over every rank."""

    def __init__(self) -> None:
        # Collective: every rank creates the group, in the same order as its other groups.
        self.group: Any = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._thread: threading.Thread | None = None
        self._done: tuple[int, str] | None = None
        self._error: BaseException | None = None
        self._staging = ReusedStaging()  # read by the save in flight: refilled only after it

    def save(self, stage: Callable[[ReusedStaging], StagedSave],
             after_shards: Callable[[], None] | None = None) -> tuple[int, str] | None:
        """Wait for the save in flight (raising its error), then stage the next save with
        ``stage`` (which copies the state into the given buffers) and start writing it.
        Returns (step, folder) of the save that was waited for, None if there was none."""
        finished = self.wait()
        staged = stage(self._staging)
        self._thread = threading.Thread(target=self._write, args=(staged, after_shards),
                                        name="plait-checkpoint", daemon=True)
        self._thread.start()
        return finished

    def wait(self) -> tuple[int, str] | None:
        """Block until the save in flight is published. Returns its (step, folder), None when
        nothing was in flight; raises its error (a CheckpointError for a write error)."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        done, error, self._done, self._error = self._done, self._error, None, None
        if error is not None:
            raise error
        return done

    def _write(self, staged: StagedSave, after_shards: Callable[[], None] | None) -> None:
        with contextlib.suppress(AttributeError, OSError):  # not Linux: keep the default priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        try:
            with comm.background():  # not training traffic, and never a training hang
                self._done = (staged.step, write_checkpoint(staged, self.group, after_shards))
        except BaseException as exc:  # handed to the training thread by wait()
            self._error = exc
