"""Data pipeline: documents -> tokenizer -> cached token stream -> packed windows -> batches.

``prepare_data`` does everything up to the windows and caches each stage under
``data.cache_dir``, so a restart neither retrains the tokenizer nor tokenizes again. It prints
nothing; the caller reports. ``train_loader`` picks the batching that ``data.batching`` names.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from plait.config import DataConfig, JobConfig
from plait.data.balance import model_coefficients
from plait.data.balanced_loader import BalancedLoader
from plait.data.loader import StepLoader, StepSampler, StepStats, val_batches
from plait.data.packing import PackedWindows, TokenStore, tokenize_to_cache
from plait.data.sources import load_documents, source_fingerprint
from plait.data.tokenizer import Tokenizer, build_tokenizer
from plait.errors import DataError

__all__ = [
    "BalancedLoader",
    "DataBundle",
    "PackedWindows",
    "StepLoader",
    "StepSampler",
    "StepStats",
    "Tokenizer",
    "prepare_data",
    "split_documents",
    "train_loader",
    "val_batches",
]

CACHE_FORMAT = 1  # bump when the document cleaning or the cache layout changes


@dataclass
class DataBundle:
    """Everything the trainer needs from the data. ``val`` has 0 windows when validation is off."""

    tokenizer: Tokenizer
    train: PackedWindows
    val: PackedWindows
    n_train_tokens: int
    n_val_tokens: int


def split_documents(
    documents: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(train, val) documents; val is ceil(val_fraction * n) of them, picked by a seeded shuffle.

    Each split keeps the source order. Validation gets at least one document when
    ``val_fraction > 0``, and train always keeps at least one.
    """
    n = len(documents)
    n_val = 0
    if val_fraction > 0:
        # The small epsilon keeps float noise (0.1 * 30 = 3.0000000000000004) from adding one.
        n_val = min(max(1, math.ceil(val_fraction * n - 1e-9)), n - 1)
    val_ids = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [d for i, d in enumerate(documents) if i not in val_ids]
    val = [d for i, d in enumerate(documents) if i in val_ids]
    return train, val


def _cache_key(
    fingerprint: str, cfg: DataConfig, tokenizer: Tokenizer, split: str, seed: int
) -> str:
    """File-name-safe key of one split's token cache: changes with anything that changes it."""
    parts = [CACHE_FORMAT, fingerprint, cfg.tokenizer, tokenizer.fingerprint, split, seed]
    digest = hashlib.sha256(repr(parts + [float(cfg.val_fraction)]).encode()).hexdigest()[:16]
    return f"{split}-{digest}"


def _check_tokens(source: str, split: str, n_tokens: int, seq_len: int, hint: str) -> None:
    if n_tokens < seq_len + 1:
        raise DataError(
            f"data.source '{source}' has {n_tokens} tokens in the {split} split; "
            f"train.seq_len = {seq_len} needs at least {seq_len + 1}{hint}"
        )


def prepare_data(data_cfg: DataConfig, seq_len: int, seed: int) -> DataBundle:
    """Load, tokenize (or reuse the cache) and pack the source into train/val windows.

    Returns a DataBundle; raises DataError for unusable sources, tokenizers or too little data.
    The corpus is read only when the tokenizer or a split's tokens are not cached yet.
    """
    cfg = data_cfg
    if not cfg.cache_dir.strip():  # an empty folder name would scatter the caches in the current folder
        raise DataError(f"data.cache_dir = {cfg.cache_dir!r} is empty; name a folder for the caches")
    fingerprint = source_fingerprint(cfg.source, cfg.text_field)
    loaded: list[list[str]] = []

    def documents() -> list[str]:
        if not loaded:
            loaded.append(load_documents(cfg.source, cfg.text_field))
        return loaded[0]

    tokenizer = build_tokenizer(cfg.tokenizer, documents, cfg.cache_dir, fingerprint)
    folder = os.path.join(cfg.cache_dir, "tokens")
    paths = {
        split: os.path.join(folder, _cache_key(fingerprint, cfg, tokenizer, split, seed))
        for split in ("train", "val")
    }
    if not all(TokenStore.exists(p) for p in paths.values()):
        docs = documents()
        if cfg.val_fraction > 0 and len(docs) < 2:
            raise DataError(
                f"data.source '{cfg.source}' holds 1 document; validation needs at least 2 "
                "(documents are never split); add documents or set data.val_fraction = 0"
            )
        train_docs, val_docs = split_documents(docs, cfg.val_fraction, seed)
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            tokenize_to_cache(split_docs, tokenizer, paths[split])
    train_store, val_store = TokenStore.open(paths["train"]), TokenStore.open(paths["val"])
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


def train_loader(cfg: JobConfig, train: PackedWindows, dp_rank: int, dp: int) -> StepLoader | BalancedLoader:
    """Data-parallel rank ``dp_rank``'s (of ``dp``) training loader for ``data.batching``."""
    t = cfg.train
    if cfg.data.batching == "balanced":
        return BalancedLoader.for_job(cfg, train.store, n_ranks=dp, ranks=[dp_rank])
    sampler = StepSampler(len(train), t.global_batch, dp_rank, dp, t.seed)
    return StepLoader(train, sampler, t.micro_batch, model_coefficients(cfg.model))
