"""Tokenized-data cache and packing into fixed-length training windows.

The cache is two ``.npy`` files per split: ``<path>.tokens.npy`` (uint32, every document's
tokens followed by EOS, back to back) and ``<path>.offsets.npy`` (int64, n_docs + 1 entries;
document k is ``tokens[offsets[k]:offsets[k + 1]]``, its EOS included). Both are memory-mapped,
so a large corpus costs page cache, not process memory, and every rank shares it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from plait.checkpoint.atomic import atomic_write
from plait.data.tokenizer import Tokenizer
from plait.errors import DataError

IGNORE_INDEX = -100  # labels with this value add nothing to the loss (torch cross_entropy)
_CHUNK_DOCS = 1024  # documents per encode_batch call: parallel enough, bounded memory


def cache_files(path: str) -> tuple[str, str]:
    """The (tokens, offsets) file names for the cache prefix ``path``."""
    return path + ".tokens.npy", path + ".offsets.npy"


def tokenize_to_cache(documents: Sequence[str], tokenizer: Tokenizer, path: str) -> None:
    """Tokenize ``documents`` (each followed by EOS) into the cache files at prefix ``path``.

    Each file is written atomically; offsets go last, so a present offsets file means the
    tokens file beside it is complete.
    """
    if tokenizer.vocab_size > 2**32:
        raise DataError(f"tokenizer vocab_size {tokenizer.vocab_size} does not fit in uint32")
    chunks, lengths = [], []
    for start in range(0, len(documents), _CHUNK_DOCS):
        for ids in tokenizer.encode_batch(documents[start : start + _CHUNK_DOCS]):
            chunks.append(np.asarray(ids + [tokenizer.eos_id], dtype=np.uint32))
            lengths.append(len(ids) + 1)
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint32)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens_file, offsets_file = cache_files(path)
    with atomic_write(tokens_file) as fh:
        np.save(fh, tokens)
    with atomic_write(offsets_file) as fh:
        np.save(fh, offsets)


@dataclass
class TokenStore:
    """A split's token stream (uint32, memory-mapped) and its document offsets (int64)."""

    tokens: np.ndarray
    offsets: np.ndarray

    @classmethod
    def open(cls, path: str) -> TokenStore:
        """Memory-map the cache at prefix ``path``; raises DataError if it is missing or corrupt."""
        tokens_file, offsets_file = cache_files(path)
        try:
            tokens = np.load(tokens_file, mmap_mode="r")
            offsets = np.load(offsets_file)
        except (OSError, ValueError) as exc:
            raise DataError(f"token cache '{path}' cannot be read ({exc}); delete it") from None
        ok = (
            tokens.dtype == np.uint32 and offsets.dtype == np.int64 and len(offsets) >= 1
            and offsets[0] == 0 and offsets[-1] == len(tokens)
        )
        if not ok:
            raise DataError(f"token cache '{path}' is inconsistent; delete it and rerun")
        return cls(tokens, offsets)

    @classmethod
    def exists(cls, path: str) -> bool:
        """Whether both cache files at prefix ``path`` are present."""
        return all(os.path.isfile(f) for f in cache_files(path))

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1


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
        to predict the next one's first token. ``position_ids`` restart at 0 at each document
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
