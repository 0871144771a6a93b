"""The token cache: a corpus tokenized once, by several worker processes, into memory-mapped shards.

A cache is a folder ``<cache_dir>/tokens/<key>`` holding, for each source unit k (plait/data/
sources.py), ``shard_<k>.tokens`` (uint32: every document's tokens followed by EOS, back to
back), ``shard_<k>.docs.npy`` (int64: each document's length, its EOS included) and, for chat
data, ``shard_<k>.mask`` (uint8: 1 where the token counts in the loss), plus ``index.json``
listing every shard's token and document counts. The folder is built under a temp name and
published whole, under a lock, so ranks (or nodes) sharing a cache build it once and never read
half of one. The key names everything that decides the tokens (source, tokenizer, format,
template), never the seed or the validation share: splits are views chosen on opening
(plait/data/token_store.py).

Each worker streams its units: it holds one batch of documents and writes as it goes, so memory
stays bounded whatever the corpus size.
"""

from __future__ import annotations

import fcntl
import glob
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from plait.checkpoint.atomic import atomic_folder
from plait.data.pieces import Unit
from plait.data.sources import read_unit, text_of
from plait.data.tokenizer import Tokenizer
from plait.errors import DataError

INDEX = "index.json"
CACHE_FORMAT = 2  # bump when the document cleaning or the cache layout changes
_BATCH_DOCS, _BATCH_CHARS = 512, 4 << 20  # documents encoded at once: bounded memory, fast calls

Progress = Callable[[int, int], None]  # (documents, tokens) done so far


@dataclass(frozen=True)
class Encoding:
    """How records become tokens; picklable, so each worker rebuilds it. ``chat`` is the chat
    template for conversation records (``field`` then holds the messages), None for text."""

    tokenizer: Tokenizer
    field: str
    chat: Any = None

    def documents(self, unit: Unit, hint: str) -> Iterator[tuple[list[int], list[int] | None]]:
        """(token ids, loss mask or None) of each non-blank document of ``unit``, without EOS."""
        if self.chat is None:
            yield from self._texts(unit, hint)
            return
        from plait.data.chat import ChatEncoder, validated_messages

        encoder = ChatEncoder(self.tokenizer, self.chat)
        for where, value in read_unit(unit, self.field, hint):
            yield encoder.encode(validated_messages(value, where), where)

    def _texts(self, unit: Unit, hint: str) -> Iterator[tuple[list[int], None]]:
        batch: list[str] = []
        chars = 0
        for where, value in read_unit(unit, self.field, hint):
            text = text_of(where, value, self.field)
            if not text.strip():  # blank documents would only add lone EOS tokens
                continue
            batch.append(text)
            chars += len(text)
            if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
                yield from ((ids, None) for ids in self.tokenizer.encode_batch(batch))
                batch, chars = [], 0
        yield from ((ids, None) for ids in self.tokenizer.encode_batch(batch))


def shard_files(folder: str, k: int) -> dict[str, str]:
    stem = os.path.join(folder, f"shard_{k:05d}")
    return {"tokens": stem + ".tokens", "docs": stem + ".docs.npy", "mask": stem + ".mask"}


def _write_shard(encoding: Encoding, unit: Unit, k: int, folder: str, hint: str,
                 counter: Any = None) -> tuple[int, int]:
    """Tokenize ``unit`` into shard ``k`` of ``folder``; returns (documents, tokens)."""
    files = shard_files(folder, k)
    lengths: list[int] = []
    n_tokens = 0
    eos = encoding.tokenizer.eos_id
    with open(files["tokens"], "wb") as tokens_out, open(files["mask"], "wb") as mask_out:
        for ids, mask in encoding.documents(unit, hint):
            np.asarray(ids + [eos], dtype=np.uint32).tofile(tokens_out)
            if mask is not None:
                np.asarray(mask + [0], dtype=np.uint8).tofile(mask_out)
            lengths.append(len(ids) + 1)
            n_tokens += len(ids) + 1
            if counter is not None and len(lengths) % 256 == 0:
                _count(counter, 256, sum(lengths[-256:]))
    if encoding.chat is None:
        os.remove(files["mask"])
    np.save(files["docs"], np.asarray(lengths, dtype=np.int64))
    if counter is not None:
        rest = len(lengths) % 256
        _count(counter, rest, sum(lengths[len(lengths) - rest:]))
    return len(lengths), n_tokens


def _count(counter: Any, docs: int, tokens: int) -> None:
    with counter.get_lock():
        counter[0] += docs
        counter[1] += tokens


# Worker processes: started by spawn (no state inherited from a parent that may run threads),
# each holding the encoding, the output folder and the shared progress counters.
_worker: dict[str, Any] = {}


def _init_worker(encoding: Encoding, folder: str, hint: str, counter: Any) -> None:
    # One worker is one core: the tokenizer's own thread pool would make the count meaningless.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["OMP_NUM_THREADS"] = "1"
    _worker.update(encoding=encoding, folder=folder, hint=hint, counter=counter)


def _run_unit(job: tuple[int, Unit]) -> tuple[int, int, int]:
    k, unit = job
    docs, tokens = _write_shard(_worker["encoding"], unit, k, _worker["folder"], _worker["hint"],
                                _worker["counter"])
    return k, docs, tokens


def _tokenize(encoding: Encoding, units: Sequence[Unit], folder: str, workers: int, hint: str,
              progress: Progress | None) -> list[tuple[int, int]]:
    """Every unit's shard in ``folder``; returns each shard's (documents, tokens). More than one
    unit always goes to worker processes, even to one: a worker is one core."""
    if len(units) == 1:  # a small source: not worth starting a process
        counts = []
        done = [0, 0]
        for k, unit in enumerate(units):
            counts.append(_write_shard(encoding, unit, k, folder, hint))
            done = [done[0] + counts[-1][0], done[1] + counts[-1][1]]
            if progress is not None:
                progress(*done)
        return counts
    ctx = multiprocessing.get_context("spawn")
    counter = ctx.Array("q", 2)
    counts: list[tuple[int, int]] = [(0, 0)] * len(units)
    # An executor, not a Pool: a worker that dies breaks it (BrokenProcessPool) instead of
    # leaving the build waiting for a result that never comes.
    with ProcessPoolExecutor(min(workers, len(units)), ctx, _init_worker, (encoding, folder, hint, counter)) as pool:
        pending = {pool.submit(_run_unit, (k, unit)) for k, unit in enumerate(units)}
        try:
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
                for future in done:
                    k, docs, tokens = future.result()  # re-raises a worker's DataError here
                    counts[k] = (docs, tokens)
                if progress is not None:
                    progress(counter[0], counter[1])
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    if progress is not None:
        progress(sum(c[0] for c in counts), sum(c[1] for c in counts))
    return counts


@contextmanager
def cache_lock(path: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing): ranks and nodes sharing a cache
    folder wait here while one of them builds, then find it built."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_cache(encoding: Encoding, units: Sequence[Unit], folder: str, workers: int,
                hint: str, progress: Progress | None = None) -> None:
    """Tokenize ``units`` into the cache ``folder`` with ``workers`` processes, published whole
    (call under :func:`cache_lock`). Raises DataError for bad records or an oversized vocabulary."""
    if encoding.tokenizer.vocab_size > 2**32:
        raise DataError(f"tokenizer vocab_size {encoding.tokenizer.vocab_size} does not fit in uint32")
    began = time.perf_counter()
    _remove_dead_builds(folder)
    with atomic_folder(folder) as tmp:
        counts = _tokenize(encoding, units, tmp, workers, hint, progress)
        index = {
            "format": CACHE_FORMAT,
            "chat": encoding.chat is not None,
            "shards": [{"docs": d, "tokens": t} for d, t in counts],
            "seconds": round(time.perf_counter() - began, 3),
        }
        with open(os.path.join(tmp, INDEX), "w") as fh:
            json.dump(index, fh, indent=1)


def _remove_dead_builds(folder: str) -> None:
    """Remove temp folders of earlier builds of ``folder`` (atomic_folder's ``.<name>.tmp-*``):
    under the lock, one can only be left by a builder that was killed."""
    parent, name = os.path.split(os.path.abspath(folder))
    for stale in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)


def cache_exists(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, INDEX))


def read_index(folder: str) -> dict[str, Any]:
    """The cache's index, checked against its shard files; raises DataError naming the first
    unreadable or inconsistent shard (and telling to delete the folder)."""
    fix = f"delete '{folder}' to rebuild it"
    try:
        with open(os.path.join(folder, INDEX)) as fh:
            index = json.load(fh)
        shards, chat = index["shards"], bool(index["chat"])
        assert index["format"] == CACHE_FORMAT
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise DataError(f"token cache '{folder}' has an unreadable {INDEX}; {fix}") from None
    for k, shard in enumerate(shards):
        files = shard_files(folder, k)
        try:
            tokens_bytes = os.path.getsize(files["tokens"])
            docs = np.load(files["docs"], mmap_mode="r")
            mask_ok = not chat or os.path.getsize(files["mask"]) == shard["tokens"]
        except (OSError, ValueError):
            raise DataError(f"token cache '{folder}': shard {k} cannot be read; {fix}") from None
        if tokens_bytes != 4 * shard["tokens"] or len(docs) != shard["docs"] or not mask_ok:
            raise DataError(f"token cache '{folder}': shard {k} does not match {INDEX}; {fix}")
    return index
