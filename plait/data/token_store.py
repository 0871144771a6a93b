"""A split of the token cache (plait/data/token_cache.py) as one token stream.

``TokenStore`` is what packing and the loaders read: ``tokens`` (uint32), ``offsets`` (int64,
n_docs + 1: document k is ``tokens[offsets[k]:offsets[k + 1]]``, its EOS included) and, for chat
data, ``loss_mask`` (uint8 per token). A split is a chosen set of the cache's documents:
``ShardedArray`` reads them, memory-mapped, as if they lay back to back, so splitting copies no
token and a changed seed or validation share reuses the same cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from plait.data.token_cache import read_index, shard_files
from plait.errors import DataError


class ShardedArray:
    """Segments of memory-mapped shard files read as one 1-D array (``view[a:b]``, ``len``).

    Segment i is ``length[i]`` items of shard ``shard[i]`` from ``shard_start[i]``, placed at
    ``start[i]`` of the view."""

    def __init__(self, paths: list[str], dtype: np.dtype, start: np.ndarray, shard: np.ndarray,
                 shard_start: np.ndarray, length: np.ndarray) -> None:
        self.paths, self.dtype = paths, np.dtype(dtype)
        self.start, self.shard, self.shard_start, self.length = start, shard, shard_start, length
        self._maps: dict[int, np.ndarray] = {}
        self._len = int(start[-1] + length[-1]) if len(start) else 0

    def __len__(self) -> int:
        return self._len

    def _map(self, k: int) -> np.ndarray:
        if k not in self._maps:  # opened on first use: a large corpus has many shards
            self._maps[k] = np.memmap(self.paths[k], dtype=self.dtype, mode="r")
        return self._maps[k]

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a ShardedArray reads contiguous slices only")
        a, b, _ = key.indices(self._len)
        parts = []
        i = int(np.searchsorted(self.start, a, side="right")) - 1
        while a < b:
            offset = a - int(self.start[i])
            take = min(b - a, int(self.length[i]) - offset)
            first = int(self.shard_start[i]) + offset
            parts.append(self._map(int(self.shard[i]))[first : first + take])
            a, i = a + take, i + 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def tolist(self) -> list[int]:
        return self[0 : self._len].tolist()


@dataclass
class TokenStore:
    """A split's token stream, its document offsets and (chat data) its loss mask."""

    tokens: Any  # np.ndarray or ShardedArray of uint32
    offsets: np.ndarray
    loss_mask: Any = None  # same length as tokens, uint8, 1 = counts in the loss; None: every token does

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1


def validation_ids(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Sorted ids of the ceil(val_fraction * n) documents held out, chosen by a seeded shuffle;
    at least one when ``val_fraction > 0``, and the training split always keeps one."""
    n_val = 0
    if val_fraction > 0:
        # The small epsilon keeps float noise (0.1 * 30 = 3.0000000000000004) from adding one.
        n_val = min(max(1, math.ceil(val_fraction * n_docs - 1e-9)), n_docs - 1)
    return np.sort(np.random.default_rng(seed).permutation(n_docs)[:n_val])


@dataclass
class CachedCorpus:
    """An opened cache: each document's shard, start in its shard and length."""

    folder: str
    chat: bool
    doc_shard: np.ndarray
    doc_start: np.ndarray
    doc_length: np.ndarray

    @classmethod
    def open(cls, folder: str) -> CachedCorpus:
        index = read_index(folder)
        lengths = [np.load(shard_files(folder, k)["docs"]) for k in range(len(index["shards"]))]
        for k, (shard, found) in enumerate(zip(index["shards"], lengths)):
            if int(found.sum()) != shard["tokens"] or (len(found) and found.min() < 1):
                raise DataError(f"token cache '{folder}': shard {k} does not match its index; "
                                f"delete '{folder}' to rebuild it")
        doc_length = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        doc_shard = np.repeat(np.arange(len(lengths)), [len(x) for x in lengths])
        starts = [np.concatenate([[0], np.cumsum(x)[:-1]]) if len(x) else x for x in lengths]
        doc_start = np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, dtype=np.int64)
        return cls(folder, bool(index["chat"]), doc_shard, doc_start, doc_length)

    @property
    def n_docs(self) -> int:
        return len(self.doc_length)

    def split(self, ids: np.ndarray) -> TokenStore:
        """The documents ``ids`` (sorted) as one store, in id order."""
        lengths = self.doc_length[ids]
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Consecutive ids of one shard are one contiguous segment.
        new = np.ones(len(ids), dtype=bool)
        if len(ids) > 1:
            new[1:] = (np.diff(ids) != 1) | (np.diff(self.doc_shard[ids]) != 0)
        heads = np.flatnonzero(new)
        seg = (offsets[:-1][heads], self.doc_shard[ids][heads], self.doc_start[ids][heads],
               np.add.reduceat(lengths, heads) if len(heads) else np.zeros(0, dtype=np.int64))
        n_shards = int(self.doc_shard.max()) + 1 if self.n_docs else 0
        files = [shard_files(self.folder, k) for k in range(n_shards)]
        tokens = ShardedArray([f["tokens"] for f in files], np.uint32, *seg)
        mask = ShardedArray([f["mask"] for f in files], np.uint8, *seg) if self.chat else None
        return TokenStore(tokens, offsets, mask)


def split_documents(documents: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) of an in-memory list, chosen as :func:`validation_ids` chooses; each keeps
    the source order."""
    val = set(validation_ids(len(documents), val_fraction, seed).tolist())
    return ([d for i, d in enumerate(documents) if i not in val], [d for i, d in enumerate(documents) if i in val])
