"""``prepare_data``: source -> tokenizer -> token cache -> train/val windows.

Every stage is cached under ``data.cache_dir``, so a restart neither retrains the tokenizer nor
tokenizes again, and the build runs under a lock, so the ranks of a node (or the nodes sharing
the folder) build once and the rest reuse it. It prints nothing but the tokenization progress
it is given a reporter for; the caller reports the rest.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from plait.config import DataConfig
from plait.data.packing import PackedWindows
from plait.data.sources import TEXT_HINT, plan_units, read_unit, source_fingerprint, text_of
from plait.data.token_cache import CACHE_FORMAT, Encoding, Progress, build_cache, cache_exists, cache_lock
from plait.data.token_store import CachedCorpus, validation_ids
from plait.data.tokenizer import Tokenizer, build_tokenizer
from plait.errors import DataError

CHAT_FIELD = "messages"  # the conversation of a chat record, as a list of {role, content}
CHAT_HINT = "; a chat record holds 'messages': a list of {\"role\", \"content\"}"
BPE_SAMPLE_CHARS = 256 << 20  # text a bpe:N tokenizer trains on: the corpus's start, bounded


@dataclass
class DataBundle:
    """Everything the trainer needs from the data. ``val`` has 0 windows when validation is off."""

    tokenizer: Tokenizer
    train: PackedWindows
    val: PackedWindows
    n_train_tokens: int
    n_val_tokens: int


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _field(cfg: DataConfig) -> str:
    return CHAT_FIELD if cfg.format == "chat" else cfg.text_field


def _hint(cfg: DataConfig) -> str:
    return CHAT_HINT if cfg.format == "chat" else TEXT_HINT


def _training_text(cfg: DataConfig) -> Iterator[str]:
    """The text a bpe:N tokenizer learns from: documents (chat: messages' contents) in source
    order, up to BPE_SAMPLE_CHARS."""
    seen = 0
    field, chat = _field(cfg), cfg.format == "chat"
    for unit in plan_units(cfg.source, chat):
        for where, value in read_unit(unit, field, _hint(cfg)):
            if chat:
                text = "\n".join(str(m.get("content", "")) for m in value if isinstance(m, dict)) \
                    if isinstance(value, list) else ""
            else:
                text = text_of(where, value, field)
            if text.strip():
                yield text
                seen += len(text)
                if seen >= BPE_SAMPLE_CHARS:
                    return


def _chat_template(cfg: DataConfig):
    if cfg.format != "chat":
        return None
    from plait.data.chat_template import load_chat_template

    return load_chat_template(cfg.tokenizer, cfg.chat_template)


def _cache_folder(cfg: DataConfig, fingerprint: str, tokenizer: Tokenizer, template) -> str:
    """Where the tokens of this source, tokenizer and format live: the key changes with anything
    that changes the tokens, never with the seed or the validation share (splits are views)."""
    parts = [CACHE_FORMAT, fingerprint, _field(cfg), cfg.tokenizer, tokenizer.fingerprint, cfg.format, repr(template)]
    digest = hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
    return os.path.join(cfg.cache_dir, "tokens", digest)


def _check_tokens(source: str, split: str, n_tokens: int, seq_len: int, hint: str) -> None:
    if n_tokens < seq_len + 1:
        raise DataError(
            f"data.source '{source}' has {n_tokens} tokens in the {split} split; "
            f"train.seq_len = {seq_len} needs at least {seq_len + 1}{hint}"
        )


def prepare_data(data_cfg: DataConfig, seq_len: int, seed: int, progress: Progress | None = None) -> DataBundle:
    """Load, tokenize (or reuse the cache) and pack the source into train/val windows.

    Returns a DataBundle; raises DataError for unusable sources, tokenizers or too little data.
    The corpus is read only when the tokenizer or the token cache is not built yet.
    """
    cfg = data_cfg
    if not cfg.cache_dir.strip():  # an empty folder name would scatter the caches in the current folder
        raise DataError(f"data.cache_dir = {cfg.cache_dir!r} is empty; name a folder for the caches")
    fingerprint = source_fingerprint(cfg.source, _field(cfg))
    with cache_lock(os.path.join(cfg.cache_dir, ".lock")):
        tokenizer = build_tokenizer(cfg.tokenizer, lambda: _training_text(cfg), cfg.cache_dir, fingerprint)
        template = _chat_template(cfg)
        folder = _cache_folder(cfg, fingerprint, tokenizer, template)
        if not cache_exists(folder):
            units = plan_units(cfg.source, cfg.format == "chat")
            encoding = Encoding(tokenizer, _field(cfg), template)
            build_cache(encoding, units, folder, cfg.workers or default_workers(), _hint(cfg), progress)
    corpus = CachedCorpus.open(folder)
    if corpus.n_docs == 0:
        raise DataError(f"data.source '{cfg.source}' holds no documents with text")
    if cfg.val_fraction > 0 and corpus.n_docs < 2:
        raise DataError(
            f"data.source '{cfg.source}' holds 1 document; validation needs at least 2 "
            "(documents are never split); add documents or set data.val_fraction = 0"
        )
    val_ids = validation_ids(corpus.n_docs, cfg.val_fraction, seed)
    keep = _complement(corpus.n_docs, val_ids)
    train_store, val_store = corpus.split(keep), corpus.split(val_ids)
    _check_tokens(cfg.source, "train", train_store.n_tokens, seq_len, "")
    if cfg.val_fraction > 0:
        hint = "; raise data.val_fraction or set it to 0"
        _check_tokens(cfg.source, "validation", val_store.n_tokens, seq_len, hint)
    return DataBundle(
        tokenizer=tokenizer,
        train=PackedWindows(train_store, seq_len),
        val=PackedWindows(val_store, seq_len),
        n_train_tokens=train_store.n_tokens,
        n_val_tokens=val_store.n_tokens,
    )


def _complement(n: int, ids: np.ndarray) -> np.ndarray:
    mask = np.ones(n, dtype=bool)
    mask[ids] = False
    return np.flatnonzero(mask)


class TokenizeReporter:
    """Progress of a token-cache build on stdout (stderr is kept for the one line of an error):
    a rich bar on a terminal, else a line every ``every`` seconds; documents and tokens per
    second either way."""

    def __init__(self, every: float = 10.0) -> None:
        self.began = self.last = time.perf_counter()
        self.every, self.bar, self.task, self.line = every, None, None, ""
        if sys.stdout.isatty():
            from rich.console import Console
            from rich.progress import Progress as Bar, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.bar = Bar(SpinnerColumn(), TextColumn("tokenizing {task.description}"), TimeElapsedColumn(),
                           transient=True, console=Console(file=sys.stdout))

    def __call__(self, docs: int, tokens: int) -> None:
        now = time.perf_counter()
        seconds = max(now - self.began, 1e-9)
        self.line = line = f"{docs:,} documents, {tokens:,} tokens ({docs / seconds:,.0f} docs/s, {tokens / seconds:,.0f} tokens/s)"
        if self.bar is not None:
            if self.task is None:
                self.bar.start()
                self.task = self.bar.add_task(line)
            self.bar.update(self.task, description=line)
        elif now - self.last >= self.every:
            print(f"plait: tokenizing: {line}", flush=True)
            self.last = now

    def close(self) -> None:
        """Say what was built (nothing when the cache was reused)."""
        if self.bar is not None and self.task is not None:
            self.bar.stop()
        if self.line:
            seconds = time.perf_counter() - self.began
            print(f"plait: tokenized {self.line.split(' (')[0]} in {seconds:.1f} s", flush=True)
