"""DDP, FSDP2 and HSDP on 2 and 4 gloo ranks against the single-process reference."""

from __future__ import annotations

import os

import pytest

from plait.launch import spawn
from plait.train.trainer import run_training
from tests.parallel.harness import RTOL, STEPS, job, roll_back, run_layouts, run_resume, write_corpus

LAYOUTS_2 = {
    "ddp2": {"parallel.dp_replicate": 2, "parallel.dp_shard": 1},
    "fsdp2": {"parallel.dp_shard": 2},
}
LAYOUTS_4 = {
    "ddp4": {"parallel.dp_replicate": 4, "parallel.dp_shard": 1},
    "fsdp4": {"parallel.dp_shard": 4},
    "hsdp2x2": {"parallel.dp_replicate": 2, "parallel.dp_shard": 2},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("parity"))
    write_corpus(folder)
    return folder


@pytest.fixture(scope="module")
def reference(workdir):
    return run_training(job(workdir, "reference"))


def assert_close(name: str, got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want), f"{name}: logged steps differ"
    for step in want:
        rel = abs(got[step] - want[step]) / abs(want[step])
        assert rel <= RTOL, f"{name} step {step}: {got[step]!r} vs reference {want[step]!r} (rel {rel:.2e})"


def test_reference_learns(reference):
    assert len(reference.losses) == STEPS
    assert reference.losses[STEPS] < reference.losses[1] - 0.5


@pytest.mark.parametrize("world,layouts", [(2, LAYOUTS_2), (4, LAYOUTS_4)], ids=["2ranks", "4ranks"])
def test_data_parallel_parity(workdir, reference, world, layouts):
    results = spawn(run_layouts, world, (workdir, layouts))
    for name in layouts:
        got = results[0][name]
        assert_close(f"{name} loss", got["losses"], reference.losses)
        assert_close(f"{name} val_loss", got["val"], reference.val_losses)
        assert_close(f"{name} grad_norm", got["norms"], reference.grad_norms)
        # every rank reports the same global loss
        for other in results[1:]:
            assert other[name]["losses"] == got["losses"]


def test_reference_differs_with_other_seed(workdir, reference):
    """Guards the harness itself: a different seed must not pass as 'parity'."""
    other = run_training(job(workdir, "seed1", **{"train.seed": 1, "train.steps": 2}))
    assert abs(other.losses[2] - reference.losses[2]) / reference.losses[2] > RTOL


@pytest.mark.parametrize("world", [1, 2])
def test_resume_is_bit_identical(workdir, world):
    if world == 1:
        common = {"checkpoint.every": 10, "checkpoint.keep": 5}
        full = run_training(job(workdir, "resume1", **common)).losses
        roll_back(os.path.join(workdir, "runs", "resume1"), 10)
        resumed = run_training(job(workdir, "resume1", **common, **{"checkpoint.resume": True})).losses
    else:
        out = spawn(run_resume, world, (workdir, {"parallel.dp_shard": 2}))[0]
        full, resumed = out["full"], out["resumed"]
    assert sorted(resumed) == list(range(11, STEPS + 1))
    for step in resumed:
        assert resumed[step] == full[step], f"step {step}: resumed {resumed[step]!r} != {full[step]!r}"
