"""The torchrun monitor kills a culprit only when the pid its heartbeat names is that rank of
this job: a heartbeat is a claim anyone who reaches the store can make, or a stale one whose
pid was reused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from plait.config import ResilienceConfig
from plait.resilience import agent
from plait.resilience.monitor import Monitor
from tests.unit.test_resilience import FakeStore

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")

PORT = "29517"


def _monitor_naming(pid: int) -> tuple[FakeStore, Monitor]:
    store = FakeStore()
    beat = {"time": time.time(), "mono": time.monotonic(), "pid": pid, "host": socket.gethostname(), "step": 3,
            "phase": "forward", "compute_s": [], "step_s": [], "nan_step": None, "rank": 0}
    store.set("hb/0", json.dumps(beat))
    monitor = Monitor(store, 1, ResilienceConfig())
    monitor.read()
    return store, monitor


def _sleeper(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)


def _ended(proc: subprocess.Popen) -> bool:
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_a_heartbeat_naming_a_foreign_process_does_not_kill_it():
    foreign = subprocess.Popen(["sleep", "60"])
    try:
        store, monitor = _monitor_naming(foreign.pid)
        agent._stop(store, monitor, [0], PORT)
        assert not _ended(foreign), "the monitor killed a process that is not one of the job's ranks"
        assert store.check(["abort"])  # the job's own ranks are still told to stop
    finally:
        foreign.kill()
        foreign.wait()


def test_another_jobs_rank_is_not_killed():
    other = _sleeper({**os.environ, "RANK": "0", "MASTER_PORT": str(int(PORT) + 1)})
    try:
        store, monitor = _monitor_naming(other.pid)
        agent._stop(store, monitor, [0], PORT)
        assert not _ended(other)
    finally:
        other.kill()
        other.wait()


def test_the_jobs_own_culprit_is_killed():
    rank = _sleeper({**os.environ, "RANK": "0", "MASTER_PORT": PORT})
    try:
        store, monitor = _monitor_naming(rank.pid)
        agent._stop(store, monitor, [0], PORT)
        assert _ended(rank) and rank.returncode == -9
    finally:
        rank.kill()
        rank.wait()


@pytest.mark.parametrize("pid", [0, -1])
def test_a_forged_process_group_pid_signals_nothing(pid, monkeypatch):
    sent = []
    monkeypatch.setattr(os, "kill", lambda *a: sent.append(a))
    store, monitor = _monitor_naming(pid)
    agent._stop(store, monitor, [0], PORT)
    assert sent == []
