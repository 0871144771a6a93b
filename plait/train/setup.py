"""What a run sets up before its model: the device, the data (tokenizer and token caches),
this rank's validation batches, and the vocabulary size resolved from the tokenizer."""

from __future__ import annotations

import os
from dataclasses import replace

import torch
import torch.distributed as dist

from plait.config import JobConfig
from plait.data import DataBundle, TokenizeReporter, prepare_data
from plait.data.loader import val_batches


def resolve_device(cfg: JobConfig) -> torch.device:
    wanted = cfg.train.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def load_data(cfg: JobConfig) -> DataBundle:
    """The tokenizer and token caches, built by the first rank of each node (or of the nodes
    sharing ``data.cache_dir``) that takes the cache's lock; the others wait on the lock, not
    on a collective (a long build would outlast its timeout), and reuse what it built."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    reporter = TokenizeReporter() if rank == 0 else None
    try:
        return prepare_data(cfg.data, cfg.train.seq_len, cfg.train.seed, reporter)
    finally:
        if reporter is not None:
            reporter.close()


def validation_batches(cfg: JobConfig, data: DataBundle, dp_rank: int, dp: int) -> list:
    """This rank's share of the ``train.eval_batches`` validation micro-batches (a global count,
    rounded up to a multiple of the dp degree so every rank runs the same number)."""
    if len(data.val) == 0:
        return []
    per_rank = -(-cfg.train.eval_batches // dp)
    return val_batches(data.val, cfg.train.micro_batch, per_rank, dp_rank, dp)


def with_vocab(cfg: JobConfig, vocab_size: int) -> JobConfig:
    """The config with ``model.vocab_size`` resolved from the tokenizer when it is 0."""
    if cfg.model.vocab_size:
        return cfg
    return replace(cfg, model=replace(cfg.model, vocab_size=vocab_size))
