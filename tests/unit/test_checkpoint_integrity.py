"""Checkpoint integrity: what the manifest must cover, a manifest that is not one, a checkpoint
of another model, a full disk during a save, and checkpoints ordered by step number."""

from __future__ import annotations

import errno
import io
import json
import os

import pytest
import torch

from plait.checkpoint.store import (
    MANIFEST,
    checkpoint_root,
    latest_checkpoint,
    latest_good_checkpoint,
    load_checkpoint,
    load_model_checkpoint,
    load_model_weights,
    save_checkpoint,
    save_model_checkpoint,
    verify_checkpoint,
)
from plait.errors import CheckpointError
from plait.launch import preflight
from plait.models.llama import build_model
from tests.unit.checkpoint_factory import (
    model_and_optimizer,
    model_checkpoint,
    rank_state,
    step_folders,
    tiny_job,
    training_checkpoint,
)


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


def shard_of(folder: str) -> str:
    return next(n for n in sorted(os.listdir(folder)) if n.endswith(".distcp"))


# ---- (a) the manifest lists exactly the folder's files


def test_a_shard_the_manifest_omits_is_not_loaded(tmp_path):
    folder = model_checkpoint(str(tmp_path / "ckpt"))
    shard = shard_of(folder)
    with open(os.path.join(folder, MANIFEST)) as fh:
        manifest = json.load(fh)
    del manifest["files"][shard]  # the damaged shard is no longer checked...
    with open(os.path.join(folder, MANIFEST), "w") as fh:
        json.dump(manifest, fh)
    with open(os.path.join(folder, shard), "r+b") as fh:
        fh.seek(-64, os.SEEK_END)
        fh.write(b"\xff" * 8)
    for load in (verify_checkpoint, load_model_checkpoint):  # ...so the manifest itself must be refused
        with pytest.raises(CheckpointError) as info:
            load(folder)
        assert "corrupt" in one_line(info.value) and f"'{shard}' is not in its {MANIFEST}" in str(info.value)


def test_a_file_added_after_the_save_is_refused_and_a_listed_one_must_exist(tmp_path):
    folder = model_checkpoint(str(tmp_path / "ckpt"))
    with open(os.path.join(folder, "extra.distcp"), "wb") as fh:
        fh.write(b"not saved by plait")
    with pytest.raises(CheckpointError, match="'extra.distcp' is not in its manifest"):
        verify_checkpoint(folder)
    os.remove(os.path.join(folder, "extra.distcp"))
    os.remove(os.path.join(folder, "config.toml"))
    with pytest.raises(CheckpointError, match="incomplete: 'config.toml' is missing"):
        verify_checkpoint(folder)


# ---- (b) a manifest that is not a manifest is a corrupt checkpoint


BAD_MANIFESTS = {
    "list": [],
    "files_list": {"files": []},
    "entry_without_bytes": {"files": {".metadata": {"crc32": 1}}},
    "entry_not_a_dict": {"files": {".metadata": 5}},
    "bytes_a_string": {"files": {".metadata": {"bytes": "12", "crc32": 0}}},
    "negative_bytes": {"files": {".metadata": {"bytes": -1, "crc32": 0}}},
}


@pytest.mark.parametrize("name", sorted(BAD_MANIFESTS))
def test_a_malformed_manifest_falls_back_to_the_previous_checkpoint(tmp_path, name):
    run_dir = str(tmp_path / "run")
    good = training_checkpoint(run_dir, 1)
    bad = training_checkpoint(run_dir, 2)
    with open(os.path.join(bad, MANIFEST), "w") as fh:
        json.dump(BAD_MANIFESTS[name], fh)
    with pytest.raises(CheckpointError) as info:
        verify_checkpoint(bad)
    assert "corrupt" in one_line(info.value) and MANIFEST in str(info.value)
    skipped: list[str] = []
    assert latest_good_checkpoint(run_dir, skipped) == good
    assert len(skipped) == 1 and MANIFEST in skipped[0]


# ---- (c) a checkpoint of another model


def test_resume_from_another_model_names_the_differing_fields(tmp_path):
    folder = training_checkpoint(str(tmp_path / "run"), 1)
    model, optimizer = model_and_optimizer(tiny_job(**{"model.ffn_dim": 48, "model.n_layers": 2}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder, [model], optimizer)
    text = one_line(info.value)
    assert "--resume" in text and "different model" in text
    assert "ffn_dim 32 (checkpoint) vs 48" in text and "n_layers 1 (checkpoint) vs 2" in text


def test_resume_of_another_model_stops_before_any_rank_starts(tmp_path):
    """The shape check runs in the launching process (preflight), not once per rank."""
    run = tmp_path / "run"
    training_checkpoint(str(run), 1)
    words = ["thou", "art", "the", "king", "of", "rome", "and", "all", "its", "hills"]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": " ".join(words[(i + j) % 10] for j in range(60))})
                                for i in range(200)))
    cfg = tiny_job(**{"run.dir": str(run), "checkpoint.resume": True, "train.steps": 5, "model.ffn_dim": 48,
                      "model.vocab_size": 0, "data.source": str(corpus), "data.tokenizer": "bpe:300",
                      "data.cache_dir": str(tmp_path / "cache"), "parallel.nproc": 2})
    with pytest.raises(CheckpointError) as info:
        preflight(cfg, 2)
    assert "ffn_dim 32 (checkpoint) vs 48" in one_line(info.value)


def test_a_shape_mismatch_inside_dcp_is_one_line(tmp_path):
    """DCP's CheckpointException is a BaseException: it must still end as one line."""
    folder = model_checkpoint(str(tmp_path / "ckpt"))
    other = build_model(tiny_job(**{"model.ffn_dim": 48}).model, seed=0)
    with pytest.raises(CheckpointError) as info:
        load_model_weights(folder, [other])
    assert "cannot be loaded" in one_line(info.value)


# ---- (d) a full disk during a save


def disk_fills_at(monkeypatch, target: str) -> None:
    """torch.save fails with ENOSPC after writing part of its output: for DCP's shard
    streams (``target = "shards"``) or for the per-rank state file (``"state"``)."""
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        to_path = isinstance(f, (str, os.PathLike))
        if to_path if target == "state" else not (to_path or isinstance(f, io.BytesIO)):
            if not to_path:
                f.write(b"\0" * 1024)  # a shard file, half written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)


@pytest.mark.parametrize("target", ["shards", "state"])
def test_a_full_disk_fails_the_save_in_one_line_and_frees_the_space(tmp_path, monkeypatch, target):
    run_dir = str(tmp_path / "run")
    previous = training_checkpoint(run_dir, 1)
    cfg = tiny_job()
    model, optimizer = model_and_optimizer(cfg)
    disk_fills_at(monkeypatch, target)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(run_dir, 2, [model], optimizer, rank_state(2), cfg, None, keep=3)
    assert "no space left on device" in one_line(info.value) and "step_000002" in str(info.value)
    assert step_folders(run_dir) == ["latest", "step_000001"]  # no step_000002.tmp left
    assert latest_checkpoint(run_dir) == previous


def test_a_full_disk_fails_a_model_only_save_in_one_line(tmp_path, monkeypatch):
    cfg = tiny_job()
    disk_fills_at(monkeypatch, "shards")
    with pytest.raises(CheckpointError) as info:
        save_model_checkpoint(build_model(cfg.model, seed=0), cfg, str(tmp_path / "ckpt"))
    assert "no space left on device" in one_line(info.value)
    assert os.listdir(tmp_path) == []


# ---- (e) checkpoints are ordered by step number


def test_step_one_million_is_newer_than_999998(tmp_path):
    run_dir = str(tmp_path / "run")
    older = training_checkpoint(run_dir, 999_998)
    newer = training_checkpoint(run_dir, 1_000_000)
    assert os.path.basename(newer) == "step_1000000" and os.path.isdir(older)
    assert latest_good_checkpoint(run_dir) == newer
    os.makedirs(os.path.join(checkpoint_root(run_dir), "step_notanumber"))
    assert latest_good_checkpoint(run_dir) == newer


def test_pruning_keeps_the_newest_by_step(tmp_path):
    run_dir = str(tmp_path / "run")
    training_checkpoint(run_dir, 999_998, keep=1)
    training_checkpoint(run_dir, 999_999, keep=1)
    training_checkpoint(run_dir, 1_000_000, keep=1)
    assert step_folders(run_dir) == ["latest", "step_1000000"]
    verify_checkpoint(os.path.join(checkpoint_root(run_dir), "step_1000000"))


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    """After resuming from step 2 past a damaged step 4, saving step 3 with keep = 1 must not
    delete step 3 for being older than the damaged one."""
    run_dir = str(tmp_path / "run")
    training_checkpoint(run_dir, 2)
    damaged = training_checkpoint(run_dir, 4)
    os.remove(os.path.join(damaged, MANIFEST))
    written = training_checkpoint(run_dir, 3, keep=1)
    assert os.path.isdir(written) and latest_good_checkpoint(run_dir) == written
    assert not os.path.isdir(os.path.join(checkpoint_root(run_dir), "step_000002"))


def test_a_training_checkpoint_round_trips(tmp_path):
    """The safe reader and planner load everything a training checkpoint holds (tensors and
    the optimizer's plain-data param_groups)."""
    cfg = tiny_job()
    folder = training_checkpoint(str(tmp_path / "run"), 7)
    saved_model, saved_optimizer = model_and_optimizer(cfg)
    model = build_model(cfg.model, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5.0)
    state = load_checkpoint(folder, [model], optimizer)
    assert state["step"] == 7
    for name, value in saved_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
    assert optimizer.param_groups[0]["lr"] == saved_optimizer.param_groups[0]["lr"]


def test_the_manifest_is_written_from_the_sums_taken_while_writing(tmp_path, monkeypatch):
    """Rank 0 reads back none of the shards to checksum them: the writing ranks' sums are
    used, and they are what a read-back gives (verify_checkpoint reads every file)."""
    from plait.checkpoint import manifest as manifest_mod, store

    read_back: list[str] = []
    real_file_sum = store.file_sum
    def recording_file_sum(path, known=None):
        if known is None:
            read_back.append(path)
        return real_file_sum(path, known)
    monkeypatch.setattr(store, "file_sum", recording_file_sum)
    monkeypatch.setattr(manifest_mod, "file_sum", recording_file_sum)
    folder = training_checkpoint(str(tmp_path / "run"), 1)
    read = {os.path.relpath(path, folder + ".tmp") for path in read_back}
    assert read == {os.path.join("state", "rank0.pt"), "config.toml"}, read
    manifest = verify_checkpoint(folder)
    assert {".metadata", "__0_0.distcp"} <= set(manifest["files"])
