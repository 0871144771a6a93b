"""Opening a checkpoint runs no code from it.

Each crafted checkpoint below starts as a real one; its DCP ``.metadata`` (or a non-tensor
value) is replaced by a pickle whose reduce would create a marker file, and its manifest
record is rewritten to match, as an attacker would. Plain ``pickle``/``dcp.load`` do create
the marker (checked first, so the tests can fail); every plait entry point must refuse with
one CheckpointError line naming the file and what it asked for, and leave no marker.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import subprocess
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

from plait.checkpoint.safe_dcp import MetadataUnpickler, load_state, read_metadata_file
from plait.checkpoint.store import (
    initial_weights,
    latest_good_checkpoint,
    load_checkpoint,
    load_model_checkpoint,
    verify_checkpoint,
)
from plait.cli import main
from plait.errors import CheckpointError
from tests.unit.checkpoint_factory import (
    model_and_optimizer,
    model_checkpoint,
    rewrite_manifest_entry,
    tiny_job,
    training_checkpoint,
)


class RunsShell:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class RunsPython:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


class StartsProcess:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return subprocess.Popen, (["touch", self.marker],)


PAYLOADS = {"os.system": (RunsShell, "posix.system"), "exec": (RunsPython, "builtins.exec"),
            "Popen": (StartsProcess, "subprocess.Popen")}


def crafted_metadata(folder: str, payload) -> str:
    """Replace ``folder``'s .metadata with its real metadata carrying ``payload`` (DCP's
    ``planner_data`` takes any object), and fix the manifest to match. Returns the file."""
    path = os.path.join(folder, ".metadata")
    with open(path, "rb") as fh:
        metadata = pickle.load(fh)  # plait's own file, just written
    metadata.planner_data = payload
    with open(path, "wb") as fh:
        pickle.dump(metadata, fh)
    rewrite_manifest_entry(folder, ".metadata")
    return path


def assert_plain_pickle_would_run(path: str, marker: str) -> None:
    """The crafted file really runs its payload when unpickled the way torch DCP does."""
    with open(path, "rb") as fh:
        pickle.load(fh)
    for _ in range(50):  # Popen returns before its child has touched the file
        if os.path.exists(marker):
            break
        time.sleep(0.02)
    assert os.path.exists(marker), "the payload does not run: this test could not fail"
    os.remove(marker)


@pytest.fixture(params=sorted(PAYLOADS))
def crafted(request, tmp_path):
    """(model-only checkpoint with a crafted .metadata, marker path, refused global)."""
    kind, refused = PAYLOADS[request.param]
    marker = str(tmp_path / "pwned")
    folder = model_checkpoint(str(tmp_path / "ckpt"))
    path = crafted_metadata(folder, kind(marker))
    assert_plain_pickle_would_run(path, marker)
    return folder, marker, refused


def run_cli(*argv: str) -> tuple[int, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, [line for line in err.getvalue().splitlines() if line.strip()]


def assert_refused(exc: CheckpointError | str, refused: str) -> None:
    text = str(exc)
    assert "\n" not in text and ".metadata" in text and refused in text, text


def test_generate_refuses_a_crafted_metadata_pickle(crafted):
    folder, marker, refused = crafted
    code, lines = run_cli("generate", folder, "--max-new-tokens", "1")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("plait: error: "), lines
    assert_refused(lines[0], refused)
    assert not os.path.exists(marker)


def test_convert_refuses_a_crafted_metadata_pickle(crafted, tmp_path):
    folder, marker, refused = crafted
    code, lines = run_cli("convert", folder, str(tmp_path / "hf"))
    assert code == 2 and len(lines) == 1, lines
    assert_refused(lines[0], refused)
    assert not os.path.exists(marker) and not os.path.exists(tmp_path / "hf")


def test_every_load_path_refuses_it(crafted):
    folder, marker, refused = crafted
    cfg = tiny_job()
    model, optimizer = model_and_optimizer(cfg)
    for load in (lambda: verify_checkpoint(folder),
                 lambda: load_model_checkpoint(folder),
                 lambda: initial_weights(folder, cfg.model),
                 lambda: load_checkpoint(folder, [model], optimizer)):
        with pytest.raises(CheckpointError) as info:
            load()
        assert_refused(info.value, refused)
    assert not os.path.exists(marker)


def test_the_dcp_reader_itself_refuses_it(crafted):
    """Past the manifest check too: the reader plait hands DCP unpickles nothing else."""
    folder, marker, refused = crafted
    model, _ = model_and_optimizer(tiny_job())
    with pytest.raises(CheckpointError) as info:
        load_state({"model": model.state_dict()}, folder)
    assert_refused(info.value, refused)
    assert not os.path.exists(marker)


def test_resume_skips_a_crafted_checkpoint(tmp_path):
    run_dir = str(tmp_path / "run")
    marker = str(tmp_path / "pwned")
    good = training_checkpoint(run_dir, 1)
    bad = training_checkpoint(run_dir, 2)
    crafted_metadata(bad, RunsShell(marker))
    skipped: list[str] = []
    assert latest_good_checkpoint(run_dir, skipped) == good
    assert len(skipped) == 1 and "posix.system" in skipped[0]
    code, lines = run_cli("generate", run_dir)  # its `latest` names the crafted step 2
    assert code == 2 and len(lines) == 1 and "posix.system" in lines[0], lines
    assert not os.path.exists(marker)


def test_non_tensor_values_are_not_unpickled(tmp_path):
    """DCP's planner opens non-tensor values with torch.load(weights_only=False)."""
    marker = str(tmp_path / "pwned")
    folder = str(tmp_path / "values")
    dcp.save({"w": torch.ones(2), "extra": RunsShell(marker)}, checkpoint_id=folder)
    dcp.load({"w": torch.zeros(2), "extra": None}, checkpoint_id=folder)
    assert os.path.exists(marker), "the payload does not run: this test could not fail"
    os.remove(marker)
    with pytest.raises(CheckpointError) as info:
        load_state({"w": torch.zeros(2), "extra": None}, folder)
    assert "\n" not in str(info.value) and "'extra'" in str(info.value)
    assert not os.path.exists(marker)


def test_plain_values_still_load(tmp_path):
    folder = str(tmp_path / "values")
    value = {"lr": 1e-3, "betas": (0.9, 0.95), "params": ["a", "b"], "fused": None, "flag": True}
    dcp.save({"w": torch.ones(2), "group": value}, checkpoint_id=folder)
    state = {"w": torch.zeros(2), "group": dict.fromkeys(value)}  # DCP flattens dicts: one value per key
    load_state(state, folder)
    assert state["group"] == value and torch.equal(state["w"], torch.ones(2))


def test_real_metadata_reads_the_same(tmp_path):
    """The allow-list covers what DCP writes: model-only and training checkpoints."""
    for folder in (model_checkpoint(str(tmp_path / "model")), training_checkpoint(str(tmp_path / "run"), 1)):
        path = os.path.join(folder, ".metadata")
        with open(path, "rb") as fh:
            plain = pickle.load(fh)
        safe = read_metadata_file(path)
        assert safe.state_dict_metadata == plain.state_dict_metadata
        assert safe.storage_data == plain.storage_data and safe.planner_data == plain.planner_data


def test_metadata_pointing_outside_the_folder_is_refused(tmp_path):
    folder = model_checkpoint(str(tmp_path / "ckpt"))
    path = os.path.join(folder, ".metadata")
    with open(path, "rb") as fh:
        metadata = MetadataUnpickler(fh, path).load()
    for info in metadata.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    with open(path, "wb") as fh:
        pickle.dump(metadata, fh)
    rewrite_manifest_entry(folder, ".metadata")
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        verify_checkpoint(folder)


def test_rank_state_file_is_loaded_as_plain_data(tmp_path):
    run_dir = str(tmp_path / "run")
    marker = str(tmp_path / "pwned")
    folder = training_checkpoint(run_dir, 1)
    state_file = os.path.join(folder, "state", "rank0.pt")
    torch.save({"step": RunsShell(marker)}, state_file)
    rewrite_manifest_entry(folder, os.path.join("state", "rank0.pt"))
    model, optimizer = model_and_optimizer(tiny_job())
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder, [model], optimizer)
    assert "\n" not in str(info.value) and "rank0.pt" in str(info.value)
    assert not os.path.exists(marker)
