"""``train.micro_batch = auto`` on one process: it picks exactly the largest micro-batch the
budget admits, and the tries leave no trace in training."""

from __future__ import annotations

import pytest

from plait.data.loader import collate
from plait.train import micro_batch
from plait.train.trainer import Trainer, run_training
from tests.parallel.harness import job, write_corpus

GIB = 2**30


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("auto_mb"))
    write_corpus(folder)
    return folder


def peaks(workdir: str, **values) -> dict[int, float]:
    """The device-side peak of one try at each candidate micro-batch, measured as the search does."""
    trainer = Trainer(job(workdir, "measure", **values))
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.0
    per_rank = trainer.cfg.train.global_batch
    windows = trainer.data.train
    return {m: micro_batch._measured(trainer, collate([windows[i] for i in range(m)]))[0]
            for m in micro_batch.candidates(per_rank)}


def test_auto_picks_the_largest_micro_batch_under_the_budget(workdir):
    values = {"train.steps": 3, "train.global_batch": 8}
    measured = peaks(workdir, **values)
    assert list(measured) == [1, 2, 4, 8] and measured[1] <= measured[2] < measured[4] < measured[8]
    headroom = 0.1
    for k, above in ((2, 4), (4, 8)):
        # A budget between the peaks of k and the next candidate admits exactly k.
        budget = (measured[k] + measured[above]) / 2 / (1 - headroom) / GIB
        auto = {**values, "train.micro_batch": "auto", "memory.budget_gib": budget, "memory.headroom": headroom}
        got = run_training(job(workdir, f"auto{k}", **auto))
        fixed = run_training(job(workdir, f"fixed{k}", **{**values, "train.micro_batch": k}))
        assert got.losses == fixed.losses and got.grad_norms == fixed.grad_norms  # the tries left no trace
    with open(f"{workdir}/runs/auto4/config.toml") as fh:
        assert "micro_batch = 4" in fh.read()


def test_activation_offload_admits_a_larger_micro_batch(workdir):
    kept = peaks(workdir, **{"train.global_batch": 8})
    moved = peaks(workdir, **{"train.global_batch": 8, "memory.activation_offload": -1})
    assert moved[8] < kept[4] < kept[8]
    budget = (moved[8] + kept[8]) / 2 / GIB
    chosen = {}
    for name, offload in (("kept", 0), ("moved", -1)):
        cfg = job(workdir, f"choose_{name}", **{"train.global_batch": 8, "train.micro_batch": "auto",
                                                  "memory.budget_gib": budget, "memory.headroom": 0.0,
                                                  "memory.activation_offload": offload})
        chosen[name] = Trainer(cfg).cfg.train.micro_batch
    assert chosen == {"kept": 4, "moved": 8}
