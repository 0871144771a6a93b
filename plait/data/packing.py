"""Packing a token stream into fixed-length training windows.

The stream is a :class:`~plait.data.token_store.TokenStore` (a split of the token cache): every
document's tokens followed by EOS, back to back, with the documents' offsets and, for chat data,
a loss mask.
"""

from __future__ import annotations

import numpy as np
import torch

from plait.data.token_store import TokenStore

IGNORE_INDEX = -100  # labels with this value add nothing to the loss (torch cross_entropy)

__all__ = ["IGNORE_INDEX", "PackedWindows", "TokenStore"]


class PackedWindows:
    """The token stream cut into windows of ``seq_len + 1`` tokens, stepping by ``seq_len``.

    Window i covers tokens ``[i * seq_len, i * seq_len + seq_len + 1)``: its first ``seq_len``
    are the inputs, its last ``seq_len`` the labels, so no token is trained on twice and none
    is skipped. Windows are full; the stream's remainder is dropped.
    """

    def __init__(self, store: TokenStore, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.store = store
        self.seq_len = seq_len
        # Positions of document starts, and of EOS tokens that end a document.
        self._doc_starts = store.offsets[:-1]
        self._doc_ends = store.offsets[1:] - 1

    def __len__(self) -> int:
        """Number of full windows."""
        return max(0, (self.store.n_tokens - 1) // self.seq_len)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Window ``i`` as int64 tensors of shape (seq_len,): input_ids, labels, position_ids.

        ``labels`` is -100 where the input is a document's closing EOS, so no document learns
        to predict the next one's first token, and (chat data) where the target is not an
        assistant token. ``position_ids`` restart at 0 at each document
        start and at the window start: a document boundary is exactly where they are 0.
        """
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        start, length = i * self.seq_len, self.seq_len
        window = np.asarray(self.store.tokens[start : start + length + 1], dtype=np.int64)
        input_ids, labels = window[:-1], window[1:].copy()
        where = np.arange(start, start + length)
        # Boundaries come from the offsets, not from the token value: a document may contain
        # the EOS text itself, and that occurrence is not a boundary.
        doc = np.searchsorted(self._doc_starts, where, side="right") - 1
        labels[where == self._doc_ends[doc]] = IGNORE_INDEX
        if self.store.loss_mask is not None:  # chat data: only the assistant's tokens are targets
            labels[self.store.loss_mask[start + 1 : start + length + 1] == 0] = IGNORE_INDEX
        position_ids = where - np.maximum(self._doc_starts[doc], start)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids.astype(np.int64)),
        }

    def document_lengths(self, i: int) -> list[int]:
        """Token lengths of the document pieces in window ``i``'s inputs: the runs between the
        places where its ``position_ids`` restart at 0, found from the offsets alone (no tokens
        are read), so any rank can cost any window."""
        start, end = i * self.seq_len, (i + 1) * self.seq_len
        inner = self._doc_starts[
            np.searchsorted(self._doc_starts, start, side="right") : np.searchsorted(self._doc_starts, end)
        ]
        return np.diff([start, *inner.tolist(), end]).tolist()
