"""Deterministic, resumable batching of packed windows over data-parallel ranks.

The order depends only on (seed, number of windows, global batch): never on the number of
ranks. Step s reads global-batch slots ``[s * G, (s + 1) * G)`` of an endless sequence of
epochs, each a fresh seeded permutation of the windows; rank r reads the r-th contiguous slice
of those G windows. So concatenating every rank's micro-batches, in rank order, gives exactly
the single-process micro-batches, and a run resumed on a different dp degree sees the same data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from plait.data.balance import imbalance, work
from plait.data.packing import PackedWindows
from plait.errors import DataError

Batch = dict[str, torch.Tensor]


@dataclass
class StepStats:
    """How well one optimizer step's data is spread, the same on every rank (no communication).

    imbalance: max / mean over the data-parallel ranks of their attention + matmul work
    (``balance.work``, document-masked attention), 1.0 = every rank equally busy. padding: the
    fraction of the step's token slots (global_batch x seq_len) that hold padding.
    """

    imbalance: float
    padding: float


class StepSampler:
    """Which windows rank ``dp_rank`` reads at each optimizer step.

    The position is global: the epoch and how many windows of that epoch's order the whole job
    has consumed. A step takes the next ``global_batch`` of them (a new epoch begins when fewer
    are left), so a run resumed on another data-parallel degree, or even another global batch,
    continues the epoch exactly where it stopped: no window is read twice or skipped.
    """

    def __init__(
        self, n_windows: int, global_batch: int, dp_rank: int, dp_size: int, seed: int
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
        if global_batch % dp_size:
            raise DataError(
                f"train.global_batch = {global_batch} is not divisible by the data-parallel "
                f"degree {dp_size}"
            )
        if n_windows < global_batch:
            raise DataError(
                f"the train split has {n_windows} windows of train.seq_len + 1 tokens, fewer "
                f"than train.global_batch = {global_batch}; use more data, a shorter "
                "train.seq_len or a smaller train.global_batch"
            )
        self.n_windows = n_windows
        self.global_batch = global_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.epoch_index, self.consumed = 0, 0  # where the next step starts
        self.last: tuple[int, int] | None = None  # (epoch, start) of the step taken last
        # Steps per epoch; an epoch's last n_windows % G windows are dropped.
        self.steps_per_epoch = n_windows // global_batch
        self._epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s window order (cached: consecutive steps share one epoch)."""
        if epoch != self._epoch:
            self._perm = np.random.default_rng(self.seed + epoch).permutation(self.n_windows)
            self._epoch = epoch
        return self._perm

    def advance(self) -> list[int]:
        """Take the next step: this rank's window indices (G / dp_size of them)."""
        if self.consumed + self.global_batch > self.n_windows:
            self.epoch_index, self.consumed = self.epoch_index + 1, 0
        self.last = (self.epoch_index, self.consumed)
        self.consumed += self.global_batch
        return self.window_ids(self.last, self.dp_rank)

    def window_ids(self, at: tuple[int, int], dp_rank: int) -> list[int]:
        """Data-parallel rank ``dp_rank``'s windows of the step starting at ``at`` = (epoch,
        position in its order): any rank can tell what every other rank reads."""
        epoch, start = at
        per_rank = self.global_batch // self.dp_size
        start += dp_rank * per_rank
        return self._permutation(epoch)[start : start + per_rank].tolist()

    def indices(self, step: int) -> list[int]:
        """This rank's windows at step ``step`` of a run that kept this global batch throughout."""
        epoch, slot = divmod(step, self.steps_per_epoch)
        return self.window_ids((epoch, slot * self.global_batch), self.dp_rank)

    def epoch(self, step: int) -> float:
        """How many passes over the train windows ``step`` steps make (fractional epochs)."""
        return step / self.steps_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch_index, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "next_step" in state:  # checkpoints before the position was global counted steps
            epoch, slot = divmod(int(state["next_step"]), self.steps_per_epoch)
            state = {"epoch": epoch, "consumed": slot * self.global_batch}
        self.epoch_index, self.consumed = int(state["epoch"]), int(state["consumed"])


def collate(windows: Sequence[Batch]) -> Batch:
    """Stack windows into one batch: each tensor becomes (len(windows), seq_len)."""
    return {key: torch.stack([w[key] for w in windows]) for key in windows[0]}


class StepLoader:
    """Hands this rank its micro-batches, one optimizer step at a time.

    ``coefs`` are the model's (attn_coef, linear_coef) from ``balance.model_coefficients``; they
    only serve ``step_stats``.
    """

    def __init__(
        self, windows: PackedWindows, sampler: StepSampler, micro_batch: int, coefs: tuple[float, float]
    ) -> None:
        per_rank = sampler.global_batch // sampler.dp_size
        if per_rank % micro_batch:
            raise DataError(
                f"train.global_batch / data-parallel degree = {per_rank} is not a multiple of "
                f"train.micro_batch = {micro_batch}"
            )
        self.windows = windows
        self.sampler = sampler
        self.micro_batch = micro_batch
        self.coefs = coefs

    def next_step(self) -> list[Batch]:
        """The next step's micro-batches for this rank, each tensor (micro_batch, seq_len)."""
        ids = self.sampler.advance()
        mb = self.micro_batch
        return [collate([self.windows[i] for i in ids[k : k + mb]]) for k in range(0, len(ids), mb)]

    def step_stats(self) -> StepStats:
        """Stats of the step ``next_step`` returned last. Every rank's windows follow from the
        deterministic sampler, so each rank computes every rank's work by itself. Windows are
        always full: no padding."""
        at = self.sampler.last
        if at is None:
            raise ValueError("step_stats() describes the last next_step(); no step was taken yet")
        rank_work = [
            sum(work(self.windows.document_lengths(i), *self.coefs) for i in self.sampler.window_ids(at, r))
            for r in range(self.sampler.dp_size)
        ]
        return StepStats(imbalance=imbalance(rank_work), padding=0.0)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def val_batches(
    windows: Sequence[Batch], micro_batch: int, n_batches: int, dp_rank: int, dp_size: int
) -> list[Batch]:
    """This rank's fixed validation micro-batches: up to ``n_batches``, same count on every rank.

    Micro-batch b holds windows ``[b * micro_batch, (b + 1) * micro_batch)`` in order; rank r
    takes b = r, r + dp_size, ... When the split is short, every rank gets fewer (but equally
    many, so collectives stay matched); raises DataError if that is none.
    """
    available = len(windows) // micro_batch
    per_rank = min(n_batches, available // dp_size)
    if per_rank < 1:
        raise DataError(
            f"the validation split is too small: it has {len(windows)} windows of "
            f"train.seq_len + 1 tokens; train.micro_batch = {micro_batch} x data-parallel "
            f"degree {dp_size} needs at least {micro_batch * dp_size}; raise data.val_fraction, "
            "lower train.micro_batch, or set data.val_fraction = 0 to skip validation"
        )
    batches = []
    for k in range(per_rank):
        b = dp_rank + k * dp_size
        batches.append(collate([windows[i] for i in range(b * micro_batch, (b + 1) * micro_batch)]))
    return batches
