"""Faults on 4 supervised ranks: each class is detected within the bound, the culprit rank is
named, the job restarts from its last good checkpoint and finishes with the same loss curve
as a fault-free run (resumes are exact, so "the same" is bit for bit)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from plait.launch import launch_training
from plait.resilience.events import read_events
from tests.parallel.harness import job, write_corpus

STEPS = 8
BOUND_S = 5.0  # max(resilience.hang_s = 5, 3 x median step time): steps here take well under 1 s


def run_job(workdir: str, name: str, **values) -> tuple[dict[int, float], list[dict]]:
    """Train under the supervisor; returns the final loss curve (metrics.jsonl) and events."""
    common = {"parallel.nproc": 4, "model.n_layers": 2, "train.steps": STEPS, "train.eval_every": 0,
              "checkpoint.every": 2, "checkpoint.keep": 5}
    cfg = job(workdir, name, **{**common, **values})
    launch_training(cfg)
    with open(os.path.join(cfg.run.dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if '"loss"' in line]
    return {r["step"]: r["loss"] for r in rows}, read_events(cfg.run.dir)


def injected_at(workdir: str, name: str) -> float:
    with open(os.path.join(workdir, "runs", name, "injections.jsonl")) as fh:
        return json.loads(fh.readline())["time"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("faults"))
    write_corpus(folder)
    return folder


@pytest.fixture(scope="module")
def clean(workdir):
    losses, events = run_job(workdir, "clean")
    assert [e["kind"] for e in events if e["kind"] in ("crash", "hang", "slow", "nan", "restart")] == []
    assert sum(e["kind"] == "start" for e in events) == 4 and events[-1]["kind"] == "done"
    return losses


def fault_of(events: list[dict], kind: str) -> dict:
    found = [e for e in events if e["kind"] == kind]
    assert found, f"no {kind} event in {[e['kind'] for e in events]}"
    return found[0]


@pytest.mark.parametrize("injection, kind, culprit", [
    ("crash:rank=1:step=5", "crash", 1),
    ("hang:rank=2:step=5", "hang", 2),                 # outside any collective
    ("hang_collective:rank=3:step=5", "hang", 3),      # inside a collective nobody else joins
    ("nan:rank=0:step=5", "nan", 0),                   # rolled back to the last checkpoint
], ids=["crash", "hang_outside", "hang_in_collective", "nan_rollback"])
def test_fault_is_named_and_the_run_recovers(workdir, clean, injection, kind, culprit):
    name = injection.split(":")[0]
    losses, events = run_job(workdir, name, **{"resilience.inject": injection})
    fault = fault_of(events, kind)
    assert fault["ranks"] == [culprit], fault
    assert fault["time"] - injected_at(workdir, name) <= BOUND_S, fault
    kinds = [e["kind"] for e in events]
    assert kinds.index("restart") > kinds.index(kind) and "resume" in kinds and kinds[-1] == "done"
    assert losses == clean


def test_sigstop_from_outside_is_a_frozen_rank(workdir, clean):
    """The monitor does not need the program's cooperation: a rank stopped by a signal from
    outside stops beating, and is named."""
    name = "sigstop"
    run_dir = os.path.join(workdir, "runs", name)
    done: dict = {}
    runner = threading.Thread(target=lambda: done.update(result=run_job(workdir, name)))
    runner.start()
    metrics = os.path.join(run_dir, "metrics.jsonl")
    while not (os.path.isfile(metrics) and '"step": 3' in open(metrics).read()):
        assert runner.is_alive(), "the job ended before the fault"
        time.sleep(0.05)
    pid = next(e["pid"] for e in read_events(run_dir) if e["kind"] == "start" and e["rank"] == 2)
    stopped_at = time.time()
    os.kill(pid, signal.SIGSTOP)
    runner.join(timeout=300)
    losses, events = done["result"]
    fault = fault_of(events, "hang")
    assert fault["ranks"] == [2] and fault["hang"] == "frozen"
    assert fault["time"] - stopped_at <= BOUND_S
    assert losses == clean


def test_slow_rank_is_reported_and_evicted(workdir, clean):
    losses, events = run_job(workdir, "slow", **{"resilience.inject": "slow:rank=3:factor=3:step=2",
                                                  "resilience.evict_slow": True})
    fault = fault_of(events, "slow")
    assert fault["ranks"] == [3] and fault["step"] <= 2 + 10
    assert "restart" in [e["kind"] for e in events]
    assert losses == clean


def test_nan_skip_policy_reports_and_carries_on(workdir, clean):
    losses, events = run_job(workdir, "nan_skip", **{"resilience.inject": "nan:rank=1:step=4",
                                                      "resilience.on_nan": "skip"})
    fault = fault_of(events, "nan")
    assert fault["ranks"] == [1] and fault["step"] == 4 and fault["fatal"] is False
    assert "restart" not in [e["kind"] for e in events]
    assert losses[3] == clean[3] and losses[4] != losses[4]  # NaN at step 4: the update was skipped
    assert sorted(losses) == list(range(1, STEPS + 1))


def test_worker_crash_during_an_outer_sync_restarts_cleanly(workdir):
    """DiLoCo over 4 single-rank workers: rank 1 dies while the outer exchange after step 4
    is in flight (the others are inside it), before the step-4 checkpoint. The crash is named,
    the job restarts from the step-2 checkpoint, and the loss curve is the fault-free one."""
    diloco = {"parallel.dp_replicate": 4, "parallel.dp_shard": 1, "lowbw.method": "diloco", "lowbw.inner_steps": 2}
    clean_losses, _ = run_job(workdir, "diloco_clean", **diloco)
    losses, events = run_job(workdir, "crash_sync", **diloco, **{"resilience.inject": "crash_sync:rank=1:step=4"})
    fault = fault_of(events, "crash")
    assert fault["ranks"] == [1], fault
    assert fault["time"] - injected_at(workdir, "crash_sync") <= BOUND_S, fault
    kinds = [e["kind"] for e in events]
    assert kinds.index("restart") > kinds.index("crash") and "resume" in kinds and kinds[-1] == "done"
    assert losses == clean_losses


def test_rank_killed_in_an_async_save_resumes_from_the_previous_checkpoint(workdir, clean):
    """checkpoint.async: rank 1 dies inside the background write of step 4, its shards written,
    while the others go on training. step_000004 is never published (``latest`` stays on
    step_000002), the crash is named, the job resumes from step 2 (itself an async save) and
    the loss curve is the synchronous fault-free one bit for bit."""
    name = "crash_save"
    losses, events = run_job(workdir, name, **{"checkpoint.async": True, "resilience.inject": "crash_save:rank=1:step=4"})
    fault = fault_of(events, "crash")
    assert fault["ranks"] == [1], fault
    assert fault["time"] - injected_at(workdir, name) <= BOUND_S, fault
    kinds = [e["kind"] for e in events]
    assert kinds.index("restart") > kinds.index("crash") and kinds[-1] == "done"
    assert fault_of(events, "resume")["detail"] == "step_000002"
    assert losses == clean


def test_torchrun_hang_is_named_stopped_and_resumed(workdir, clean):
    """Under torchrun, a rank that hangs outside any collective would keep the others waiting
    for the process-group timeout (30 min on gloo). plait's monitor, started by rank 0,
    names it within the bound and stops the job; torchrun restarts the workers and they
    resume from the last good checkpoint, finishing with the fault-free loss curve."""
    import subprocess
    import sys

    from plait.config import to_toml

    name = "torchrun_hang"
    common = {"parallel.nproc": 4, "model.n_layers": 2, "train.steps": STEPS, "train.eval_every": 0,
              "checkpoint.every": 2, "checkpoint.keep": 5, "resilience.inject": "hang:rank=2:step=5"}
    cfg = job(workdir, name, **common)
    path = os.path.join(workdir, f"{name}.toml")
    with open(path, "w") as fh:
        fh.write(to_toml(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         "--max-restarts", "1", "-m", "plait", "train", path],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = read_events(cfg.run.dir)
    fault = fault_of(events, "hang")
    assert fault["ranks"] == [2] and fault["agent"] == "torchrun", fault
    assert fault["time"] - injected_at(workdir, name) <= BOUND_S, fault
    kinds = [e["kind"] for e in events]
    assert kinds.index("restart") > kinds.index("hang") and "resume" in kinds and kinds[-1] == "done"
    with open(os.path.join(cfg.run.dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if '"loss"' in line]
    assert {r["step"]: r["loss"] for r in rows} == clean
