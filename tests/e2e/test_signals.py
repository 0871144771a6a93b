"""A multi-rank `plait train` ends with its launcher: SIGTERM (timeout, systemd, docker stop,
Slurm) stops it like Ctrl-C, every rank included, and leaves the last checkpoint whole; a
SIGKILLed launcher takes its ranks with it (the parent-death signal)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from plait.checkpoint.store import latest_good_checkpoint, load_model_checkpoint
from tests.e2e.test_bad_inputs import TINY
from tests.parallel.harness import write_corpus

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads processes from /proc")


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid``, with its start time (to tell a reused pid)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        fields = _stat(int(name)) if name.isdigit() else None
        if fields:
            children.setdefault(int(fields[1]), []).append(int(name))
    found, todo = {}, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        fields = _stat(child)
        if fields:
            found[child] = fields[19]
            todo += children.get(child, [])
    return found


def still_running(procs: dict[int, str], within_s: float) -> list[int]:
    """The processes of ``procs`` still running (zombies count as ended) after ``within_s``."""
    deadline = time.time() + within_s
    while True:
        alive = [pid for pid, start in procs.items()
                 if (fields := _stat(pid)) and fields[0] != "Z" and fields[19] == start]
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.1)


def kill_all(procs: dict[int, str]) -> None:
    """Leave no process of a failed test behind."""
    for pid in still_running(procs, within_s=0):
        os.kill(pid, signal.SIGKILL)


def start_training(tmp_path, watch: bool) -> tuple[subprocess.Popen, str, dict[int, str]]:
    """A two-rank run that would go on for long; returns it once its ranks train and it has
    a checkpoint, with its processes."""
    run_dir = str(tmp_path / "run")
    args = [*TINY, "--data.source", write_corpus(str(tmp_path), n_docs=40), "--data.cache_dir", str(tmp_path / "cache"),
            "--run.dir", run_dir, "--parallel.nproc", "2", "--train.steps", "100000", "--train.eval_every", "0",
            "--checkpoint.every", "2", "--resilience.watch", str(watch).lower()]
    log = open(tmp_path / "launcher.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "plait", "train", *args], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    metrics = os.path.join(run_dir, "metrics.jsonl")
    try:
        while latest_good_checkpoint(run_dir) is None or not os.path.exists(metrics) or not os.path.getsize(metrics):
            assert proc.poll() is None, open(tmp_path / "launcher.log").read()
            assert time.time() < deadline, "the run did not start training"
            time.sleep(0.2)
        procs = descendants(proc.pid)
    except BaseException:
        kill_all(descendants(proc.pid))
        proc.kill()
        raise
    assert len(procs) >= 2, procs  # the two ranks at least
    return proc, run_dir, procs


@pytest.mark.parametrize("watch", [True, False], ids=["supervisor", "spawn"])
def test_sigterm_stops_every_rank_and_keeps_the_last_checkpoint(tmp_path, watch):
    proc, run_dir, procs = start_training(tmp_path, watch)
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=30)
        left = still_running(procs, within_s=5)
    finally:
        proc.kill()
        kill_all(procs)
    log = open(tmp_path / "launcher.log").read()
    assert code == 130, log
    assert log.splitlines()[-1] == "plait: interrupted", log
    assert left == [], "ranks outlived their launcher"
    folder = latest_good_checkpoint(run_dir)  # a save cut short is only a .tmp, never picked up
    assert folder is not None and not folder.endswith(".tmp")
    load_model_checkpoint(folder)
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        assert [json.loads(line) for line in fh if line.strip()]


@pytest.mark.parametrize("watch", [True, False], ids=["supervisor", "spawn"])
def test_ranks_end_when_their_launcher_is_killed(tmp_path, watch):
    proc, _, procs = start_training(tmp_path, watch)
    proc.kill()
    proc.wait(timeout=10)
    try:
        assert still_running(procs, within_s=5) == [], "ranks outlived their SIGKILLed launcher"
    finally:
        kill_all(procs)
