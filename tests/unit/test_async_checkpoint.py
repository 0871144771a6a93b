"""``checkpoint.async``: the config key (a Python keyword: attribute ``async_save``), the
combinations refused before any rank starts, and the background save in one process: it writes
what the step held, and a failed write surfaces on the training thread as one line."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from plait.checkpoint import store
from plait.checkpoint.async_save import BackgroundSaver
from plait.checkpoint.store import latest_checkpoint, load_checkpoint, stage_checkpoint, verify_checkpoint
from plait.cli import main
from plait.config import build_config, reference_markdown, to_toml
from plait.errors import CheckpointError, ConfigError
from plait.models.llama import build_model
from tests.unit.checkpoint_factory import model_and_optimizer, rank_state, step_folders, tiny_job, training_checkpoint
from tests.unit.test_checkpoint_integrity import disk_fills_at, one_line


def test_the_key_is_async_in_toml_on_the_command_line_and_in_the_resolved_config(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("[checkpoint]\nasync = true\n")
    from_toml = build_config(str(path))
    from_cli = build_config(overrides=[("checkpoint.async", "true")])
    assert from_toml.checkpoint.async_save is True and from_cli.checkpoint.async_save is True
    assert build_config().checkpoint.async_save is False
    resolved = to_toml(from_cli)
    assert "async = true" in resolved and "async_save" not in resolved
    (tmp_path / "config.toml").write_text(resolved)
    assert build_config(str(tmp_path / "config.toml")) == from_cli
    assert "| `checkpoint.async` | bool | `false` |" in reference_markdown()


@pytest.mark.parametrize("key", ["checkpoint.async_save", "checkpoint.asynch"])
def test_the_attribute_name_is_no_key_and_the_suggestion_is_the_key(key):
    with pytest.raises(ConfigError, match=r"unknown config key .* \(did you mean 'checkpoint.async'\?\)"):
        build_config(overrides=[(key, "true")])


@pytest.mark.parametrize("args, message", [
    (["--checkpoint.async", "true", "--lowbw.method", "diloco", "--parallel.dp_replicate", "2",
      "--lowbw.inner_steps", "2", "--train.steps", "4"], "checkpoint.async = true does not support lowbw.method"),
    (["--checkpoint.async", "true", "--checkpoint.every", "2", "--train.steps", "4",
      "--resilience.inject", "crash_save:rank=1:step=3"], "names step 3, which saves no checkpoint"),
], ids=["lowbw", "crash_save_off_a_save"])
def test_bad_combinations_stop_before_any_rank_starts(tmp_path, capsys, args, message):
    """Exit code 2 and one line from the config checks: no rank was started (run.dir is empty)."""
    run_dir = tmp_path / "run"
    code = main(["train", "--run.dir", str(run_dir), "--parallel.nproc", "2", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and message in err, err
    assert not run_dir.exists() or not os.listdir(run_dir)


def staged(run_dir: str, step: int, model, optimizer, keep: int = 3):
    """What the trainer hands a BackgroundSaver: stages the save into the saver's buffers."""
    return lambda staging: stage_checkpoint(run_dir, step, [model], optimizer, rank_state(step), tiny_job(), None,
                                            keep, staging=staging)


def test_a_background_save_writes_the_step_it_was_given(tmp_path, monkeypatch):
    """The optimizer changes the weights in place right after the save is handed over: the
    checkpoint still holds the step's values (the copy), and is published and verified."""
    run_dir = str(tmp_path / "run")
    cfg = tiny_job()
    model, optimizer = model_and_optimizer(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    updated, real_save = threading.Event(), store.dcp.save
    monkeypatch.setattr(store.dcp, "save", lambda *a, **kw: (updated.wait(10), real_save(*a, **kw))[1])
    saver = BackgroundSaver()
    assert saver.save(staged(run_dir, 1, model, optimizer)) is None  # nothing was in flight
    with torch.no_grad():  # the write starts only after this update
        for p in model.parameters():
            p.add_(1.0)
    updated.set()
    step, folder = saver.wait()
    assert step == 1 and latest_checkpoint(run_dir) == folder and saver.wait() is None
    verify_checkpoint(folder)
    loaded = build_model(cfg.model, seed=1)
    load_checkpoint(folder, [loaded], torch.optim.AdamW(loaded.parameters()))
    for name, value in before.items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)


def test_the_next_save_waits_for_the_one_in_flight_and_keep_prunes(tmp_path):
    run_dir = str(tmp_path / "run")
    model, optimizer = model_and_optimizer(tiny_job())
    saver = BackgroundSaver()
    for step in (1, 2, 3):
        finished = saver.save(staged(run_dir, step, model, optimizer, keep=2))
        assert finished is None if step == 1 else finished[0] == step - 1
    assert saver.wait()[0] == 3
    assert step_folders(run_dir) == ["latest", "step_000002", "step_000003"]


@pytest.mark.parametrize("target", ["shards", "state"])
def test_a_failed_background_write_surfaces_at_the_next_wait_in_one_line(tmp_path, monkeypatch, target):
    run_dir = str(tmp_path / "run")
    previous = training_checkpoint(run_dir, 1)
    model, optimizer = model_and_optimizer(tiny_job())
    saver = BackgroundSaver()
    disk_fills_at(monkeypatch, target)
    saver.save(staged(run_dir, 2, model, optimizer))
    with pytest.raises(CheckpointError) as info:
        saver.wait()
    assert "no space left on device" in one_line(info.value) and "step_000002" in str(info.value)
    assert step_folders(run_dir) == ["latest", "step_000001"]  # the temp folder was removed
    assert latest_checkpoint(run_dir) == previous
    assert saver.wait() is None  # the error is reported once


def test_staging_reuses_its_buffers_and_takes_each_save_values():
    """The second save is copied into the first one's buffers (no new allocation), with its own
    tensors and its own plain values (a learning rate the scheduler changed)."""
    from plait.checkpoint.staging import ReusedStaging

    staging = ReusedStaging()
    weight = torch.ones(4, 3)
    first = staging.stage({"model": {"w": weight}, "optim": {"lr": 1.0}})
    pointer = first["model"]["w"].data_ptr()
    weight.add_(1.0)
    assert first["model"]["w"].data_ptr() != weight.data_ptr() and first["model"]["w"].eq(1.0).all()
    second = staging.stage({"model": {"w": weight}, "optim": {"lr": 0.5}})
    assert second["model"]["w"].data_ptr() == pointer and second["model"]["w"].eq(2.0).all()
    assert second["optim"]["lr"] == 0.5
    third = staging.stage({"model": {"w": weight, "b": torch.zeros(2)}, "optim": {"lr": 0.5}})  # new keys
    assert third["model"]["b"].eq(0.0).all() and third["model"]["w"].eq(2.0).all()
