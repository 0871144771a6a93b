"""Single-process trainer behaviours: bf16 autocast, clipping, accumulation invariance."""

from __future__ import annotations

import os

import pytest
import torch

from plait.train.trainer import run_training
from tests.parallel.harness import job, write_corpus


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("trainer"))
    write_corpus(folder, n_docs=60)
    return folder


def losses(workdir, name, **values):
    return run_training(job(workdir, name, **{"train.steps": 3, "train.eval_every": 0, **values}))


def test_bf16_autocast_tracks_fp32(workdir):
    fp32, bf16 = losses(workdir, "fp32"), losses(workdir, "bf16", **{"train.dtype": "bf16"})
    for step in fp32.losses:
        assert bf16.losses[step] != fp32.losses[step]  # bf16 really ran
        assert abs(bf16.losses[step] - fp32.losses[step]) / fp32.losses[step] < 2e-2


def test_gradient_accumulation_matches_one_big_micro_batch(workdir):
    """8 sequences as 4 micro-batches of 2 or 1 of 8: the same objective, the same losses."""
    small = losses(workdir, "acc4", **{"train.micro_batch": 2})
    big = losses(workdir, "acc1", **{"train.micro_batch": 8})
    for step in small.losses:
        assert small.losses[step] == pytest.approx(big.losses[step], rel=1e-5)


def test_clipping_changes_the_update(workdir):
    clipped = losses(workdir, "clip", **{"train.grad_clip": 0.01})
    free = losses(workdir, "noclip", **{"train.grad_clip": 0.0})
    assert clipped.losses[1] == free.losses[1] and clipped.grad_norms[1] > 0.01
    assert clipped.losses[3] != pytest.approx(free.losses[3], rel=1e-6)


def test_activation_checkpointing_modes_match_none(workdir):
    """Recomputation changes memory, never the numbers."""
    none = losses(workdir, "ac_none")
    for mode in ("full", "selective", "op"):
        got = losses(workdir, f"ac_{mode}", **{"train.activation_checkpointing": mode})
        assert got.losses == none.losses and got.grad_norms == none.grad_norms, mode


def test_compiled_blocks_match_eager(workdir):
    eager = losses(workdir, "eager", **{"train.steps": 2})
    compiled = losses(workdir, "compiled", **{"train.steps": 2, "train.compile": True})
    for step in eager.losses:
        assert compiled.losses[step] == pytest.approx(eager.losses[step], rel=1e-5)


def test_init_from_starts_from_the_checkpoint_weights_with_a_fresh_optimizer(workdir):
    """checkpoint.init_from: the weights are the checkpoint's (also the DiLoCo outer loop's
    global copy, taken after the load), the step, schedule and optimizer start over."""
    from plait.checkpoint.store import load_model_checkpoint
    from plait.train.trainer import Trainer

    src = losses(workdir, "init_src")
    source = os.path.join(workdir, "runs", "init_src")
    saved = load_model_checkpoint(source)[0].state_dict()
    trainer = Trainer(job(workdir, "init_dst", **{"checkpoint.init_from": source, "lowbw.method": "diloco",
                                                     "lowbw.inner_steps": 4}))
    got = trainer.model.state_dict()
    assert saved.keys() == got.keys() and all(torch.equal(saved[k], got[k]) for k in saved)
    flat = torch.cat([saved[name].flatten() for name, _ in trainer.model.named_parameters()])
    assert torch.equal(torch.cat([g.flatten() for g in trainer.outer.global_w]), flat)
    assert trainer.start_step == 0 and not trainer.optimizer.state
    assert trainer.evaluate() == pytest.approx(src.val_losses[max(src.val_losses)], rel=1e-6)
