"""Length-balanced batching (``data.batching = "balanced"``): documents, not windows, per rank.

Each step, ``BalancedStream`` (plait/data/balance.py) places whole documents, or seq_len-sized
pieces of longer ones, into n_ranks x (global_batch / n_ranks) rows of seq_len tokens so that
every data-parallel rank gets about the same attention + matmul work. Every rank runs the same
deterministic stream and keeps its own rank's rows: no communication, and all ranks' rows in
rank order are the step's whole batch. The assignment depends on n_ranks, so a single process
reproduces a dp run by reading every rank's rows (``ranks=range(n_ranks)``), not by n_ranks = 1.

Rows hold pieces back to back, then padding. A piece is its own document for the attention
mask (position_ids restart at 0), and so is the padding, which no real token can see. Labels
stay inside their piece, so the last token of each piece scores nothing: that is the closing
EOS (as in packed windows), or, for a document split over pieces, one target per split that
packed windows would have scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from plait.config import JobConfig
from plait.data.balance import Assignment, BalancedStream, Piece, model_coefficients
from plait.data.loader import Batch, StepStats, collate
from plait.data.packing import IGNORE_INDEX, TokenStore
from plait.errors import DataError

PAD_ID = 0  # any valid id does: padding is attended to by nothing real and never scored


class BalancedLoader:
    """Hands the rows of ``ranks`` (data-parallel ranks out of ``n_ranks``) as micro-batches,
    one optimizer step at a time; an endless run of epochs, epoch e shuffled with seed + e.

    ``coefs`` are the model's (attn_coef, linear_coef) from ``balance.model_coefficients``.
    """

    def __init__(
        self, store: TokenStore, seq_len: int, global_batch: int, micro_batch: int,
        coefs: tuple[float, float], seed: int, n_ranks: int, ranks: Sequence[int],
    ) -> None:
        if global_batch % n_ranks or (global_batch // n_ranks) % micro_batch:
            raise ValueError(
                f"global_batch {global_batch} must be a multiple of micro_batch {micro_batch} x n_ranks {n_ranks}"
            )
        if not all(0 <= r < n_ranks for r in ranks):
            raise ValueError(f"ranks {list(ranks)} must lie in 0..{n_ranks - 1}")
        slots = global_batch * seq_len
        if store.n_tokens < slots:
            raise DataError(
                f"the train split has {store.n_tokens} tokens, fewer than one step's "
                f"train.global_batch x train.seq_len = {slots}; use more data, a shorter "
                "train.seq_len or a smaller train.global_batch"
            )
        self.store, self.seq_len, self.micro_batch = store, seq_len, micro_batch
        self.rows_per_rank = global_batch // n_ranks
        self.coefs, self.seed, self.n_ranks, self.ranks = coefs, seed, n_ranks, list(ranks)
        self.doc_lengths = np.diff(store.offsets).tolist()  # each document's EOS included
        self.epoch = 0
        self.stream = self._stream(self.epoch)
        self._last: Assignment | None = None

    @classmethod
    def for_job(cls, cfg: JobConfig, store: TokenStore, n_ranks: int, ranks: Sequence[int]) -> BalancedLoader:
        """The loader a job's config asks for, reading ``ranks`` of ``n_ranks`` dp ranks."""
        t = cfg.train
        return cls(store, t.seq_len, t.global_batch, t.micro_batch, model_coefficients(cfg.model), t.seed,
                   n_ranks, ranks)

    def _stream(self, epoch: int) -> BalancedStream:
        return BalancedStream(self.doc_lengths, self.n_ranks, self.rows_per_rank, self.seq_len, self.coefs,
                              seed=self.seed + epoch)

    def next_step(self) -> list[Batch]:
        """The next step's micro-batches for ``ranks``, each tensor (micro_batch, seq_len)."""
        try:
            assignment = next(self.stream)
        except StopIteration:  # every document of the epoch was placed: a new epoch, a new order
            self.epoch += 1
            self.stream = self._stream(self.epoch)
            assignment = next(self.stream)
        self._last = assignment
        rows = [self._row(pieces) for r in self.ranks for pieces in assignment.ranks[r]]
        mb = self.micro_batch
        return [collate(rows[k : k + mb]) for k in range(0, len(rows), mb)]

    def _row(self, pieces: list[Piece]) -> Batch:
        """One sequence: the pieces back to back, then padding, each restarting position_ids at
        0; a label is the next token of the same piece, -100 at a piece's last token and on
        padding."""
        input_ids = np.full(self.seq_len, PAD_ID, dtype=np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        position_ids = np.empty(self.seq_len, dtype=np.int64)
        at = 0
        for doc, start, length in pieces:
            first = int(self.store.offsets[doc]) + start
            input_ids[at : at + length] = self.store.tokens[first : first + length]
            labels[at : at + length - 1] = input_ids[at + 1 : at + length]
            if self.store.loss_mask is not None:  # chat data: only the assistant's tokens are targets
                scored = self.store.loss_mask[first + 1 : first + length] == 1
                labels[at : at + length - 1][~scored] = IGNORE_INDEX
            position_ids[at : at + length] = np.arange(length)
            at += length
        position_ids[at:] = np.arange(self.seq_len - at)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
        }

    def step_stats(self) -> StepStats:
        """Stats of the step ``next_step`` returned last, from the assignment every rank knows."""
        if self._last is None:
            raise ValueError("step_stats() describes the last next_step(); no step was taken yet")
        return StepStats(imbalance=self._last.imbalance, padding=self._last.padding_waste)

    def state_dict(self) -> dict[str, Any]:
        """The epoch and the stream's position in it (the same on every rank)."""
        return {"epoch": self.epoch, "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.stream = self._stream(self.epoch)
        self.stream.load_state_dict(state["stream"])
