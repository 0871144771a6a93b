"""The training loader a job's ``data.batching`` names, for one data-parallel rank."""

from __future__ import annotations

from plait.config import JobConfig
from plait.data.balance import model_coefficients
from plait.data.balanced_loader import BalancedLoader
from plait.data.loader import StepLoader, StepSampler
from plait.data.packing import PackedWindows


def train_loader(cfg: JobConfig, train: PackedWindows, dp_rank: int, dp: int) -> StepLoader | BalancedLoader:
    """Data-parallel rank ``dp_rank``'s (of ``dp``) training loader for ``data.batching``."""
    t = cfg.train
    if cfg.data.batching == "balanced":
        return BalancedLoader.for_job(cfg, train.store, n_ranks=dp, ranks=[dp_rank])
    sampler = StepSampler(len(train), t.global_batch, dp_rank, dp, t.seed)
    return StepLoader(train, sampler, t.micro_batch, model_coefficients(cfg.model))
