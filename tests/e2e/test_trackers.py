"""W&B (offline) and MLflow (file store) log what metrics.jsonl holds: read back, key by key."""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys

import pytest

from plait.train.trackers import scalars
from tests.e2e.test_bad_inputs import TINY
from tests.parallel.harness import write_corpus

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

STEPS = 4


def wandb_history(path: str) -> dict[int, dict[str, float]]:
    """The history rows of an offline ``.wandb`` file: W&B's record log (a 7-byte header, then
    LevelDB-log records in 32 KiB blocks, each a protobuf ``Record``)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as fh:
        data = fh.read()
    assert data[:4] == b":W&B", "not a W&B record log"
    block, offset, pending, rows = 32768, 7, b"", {}
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        payload = data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            break
        pending = payload if kind in (1, 2) else pending + payload
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        if record.HasField("history"):
            items = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            rows[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return rows


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers")
    run_dir = str(root / "run")
    args = [*TINY, "--data.source", write_corpus(str(root), n_docs=40), "--data.cache_dir", str(root / "cache"),
            "--run.dir", run_dir, "--train.steps", str(STEPS), "--metrics.wandb", "true", "--metrics.mlflow", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    env.pop("WANDB_MODE", None)
    done = subprocess.run([sys.executable, "-m", "plait", "train", *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        logged = {r["step"]: scalars(r) for r in map(json.loads, fh) if "step" in r}
    assert len(logged) >= STEPS
    return run_dir, logged


def test_wandb_offline_logs_the_same_keys(tracked_run):
    run_dir, logged = tracked_run
    files = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1, files
    history = wandb_history(files[0])
    assert sorted(history) == sorted(logged)
    for step, values in logged.items():
        assert history[step].keys() == values.keys(), step
        assert history[step] == pytest.approx(values), step


def test_mlflow_file_store_logs_the_same_keys(tracked_run):
    from mlflow.tracking import MlflowClient

    run_dir, logged = tracked_run
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient("file:" + os.path.join(run_dir, "mlruns"))
    experiment = client.get_experiment_by_name("plait")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["train.steps"] == str(STEPS)
    keys = set().union(*(values.keys() for values in logged.values()))
    assert set(run.data.metrics) == keys
    for key in keys:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == pytest.approx({s: v[key] for s, v in logged.items() if key in v}), key
