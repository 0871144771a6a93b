"""The monitor's judgement of a stale heartbeat from what the OS says of the process (fake
/proc readings and a fake clock), and its checks on the records it reads from the store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from plait.config import ResilienceConfig
from plait.resilience.evidence import GONE, IDLE, STOPPED, UNKNOWN, WORKING, ProcessSample, ProcessWatch, \
    parse_stat, read_proc_stat
from plait.resilience.monitor import Monitor
from tests.unit.test_resilience import FakeStore

HERE = socket.gethostname()  # the monitor asks the OS only about processes on its own host


class FakeProc:
    """/proc as the test says it is: state and CPU ticks per pid; a clock the test moves."""

    def __init__(self):
        self.now = 1000.0
        self.stat: dict[int, ProcessSample | str] = {}
        self.run_wait: dict[int, float] = {}  # seconds waited on a run queue, per pid

    def read(self, pid: int):
        return self.stat.get(pid, GONE)

    def wait(self, pid: int):
        return self.run_wait.get(pid)

    def clock(self) -> float:
        return self.now


def beat(rank, age=0.0, phase="forward", mono=1000.0, host=HERE, compute=(0.1, 0.1, 0.1)):
    return {"rank": rank, "time": time.time() - age, "mono": mono, "pid": 100 + rank, "host": host, "step": 5,
            "phase": phase, "collective": None, "compute_s": list(compute), "step_s": [0.5] * len(compute),
            "nan_step": None}


def watched(n=4, **cfg) -> tuple[Monitor, FakeStore, FakeProc]:
    store, proc = FakeStore(), FakeProc()
    for rank in range(n):
        store.set(f"hb/{rank}", json.dumps(beat(rank)))
        proc.stat[100 + rank] = ProcessSample("S", 50)
    return Monitor(store, n, ResilienceConfig(**cfg), ProcessWatch(proc.read, proc.clock, proc.wait)), store, proc


def test_a_starved_runnable_rank_with_advancing_cpu_time_is_never_frozen():
    m, store, proc = watched()
    assert m.check([None] * 4) is None
    for second in range(1, 120):  # two minutes without a heartbeat from rank 2
        proc.now += 1.0
        state = "R" if second % 2 else "S"  # runnable, or briefly asleep between time slices
        proc.stat[102] = ProcessSample(state, 50 + second)  # but always using some CPU time
        store.set("hb/2", json.dumps(beat(2, age=second)))
        for other in (0, 1, 3):
            store.set(f"hb/{other}", json.dumps(beat(other)))
        assert m.check([None] * 4) is None, second


def test_a_stopped_rank_is_frozen_at_the_old_staleness_bound():
    m, store, proc = watched()
    assert m.check([None] * 4) is None
    proc.stat[101] = ProcessSample("T", 50)  # SIGSTOP
    store.set("hb/1", json.dumps(beat(1, age=1.5)))
    assert m.check([None] * 4) is None  # beating 1.5 s ago is fresh
    store.set("hb/1", json.dumps(beat(1, age=2.1)))
    fault = m.check([None] * 4)
    assert (fault.kind, fault.ranks, fault.extra["hang"]) == ("hang", [1], "frozen")
    assert "stopped" in fault.detail and m.stale_s() == 2.0 < m.cfg.hang_s  # reported within resilience.hang_s


def test_a_dead_or_zombie_rank_is_frozen_at_the_old_staleness_bound():
    m, store, proc = watched()
    proc.stat[103] = ProcessSample("Z", 50)
    store.set("hb/3", json.dumps(beat(3, age=2.1)))
    assert m.check([None] * 4).ranks == [3]


def test_a_rank_asleep_without_cpu_time_past_the_scaled_bound_is_a_hang():
    m, store, proc = watched()
    assert m.check([None] * 4) is None  # first look: CPU ticks 50 on every rank
    assert m.idle_bound() == 5.0  # max(2 s, hang_s = 5 s, 3 x 0.5 s steps, no save seen)
    for second in range(1, 6):
        proc.now += 1.0
        store.set("hb/0", json.dumps(beat(0, age=second)))
        assert m.check([None] * 4) is None, second  # asleep, but not for longer than the bound yet
    proc.now += 0.5
    store.set("hb/0", json.dumps(beat(0, age=5.5)))
    fault = m.check([None] * 4)
    assert (fault.kind, fault.ranks, fault.extra["hang"]) == ("hang", [0], "frozen")
    assert "no CPU time" in fault.detail


def test_the_idle_bound_scales_with_the_checkpoint_saves_seen():
    m, store, proc = watched()
    store.set("hb/0", json.dumps(beat(0, phase="checkpoint", mono=2000.0)))
    m.check([None] * 4)
    store.set("hb/0", json.dumps(beat(0, phase="data", mono=2004.0)))  # that save took 4 s
    m.check([None] * 4)
    assert m.save_s == [4.0] and m.idle_bound() == 8.0
    for second in range(1, 8):  # a save in D state, waiting on the disk, no CPU time: excused
        proc.now += 1.0
        proc.stat[100] = ProcessSample("D", 50)
        store.set("hb/0", json.dumps(beat(0, age=second, phase="checkpoint")))
        assert m.check([None] * 4) is None, second
    proc.now += 1.5
    store.set("hb/0", json.dumps(beat(0, age=8.5, phase="checkpoint")))
    assert m.check([None] * 4).ranks == [0]


def test_cpu_time_advancing_resets_the_idle_clock():
    m, store, proc = watched()
    m.check([None] * 4)
    for second in range(1, 30):
        proc.now += 1.0
        if second % 4 == 0:  # a long C call that wakes now and then
            proc.stat[100] = ProcessSample("S", 50 + second)
        store.set("hb/0", json.dumps(beat(0, age=second)))
        assert m.check([None] * 4) is None, second


def test_without_proc_or_on_another_host_the_heartbeat_age_decides():
    m, store, proc = watched()
    proc.stat[102] = UNKNOWN  # no /proc (macOS, Windows)
    proc.stat[101] = ProcessSample("R", 50)
    store.set("hb/2", json.dumps(beat(2, age=2.1)))
    assert m.check([None] * 4).ranks == [2]
    m, store, proc = watched()
    proc.stat[101] = ProcessSample("R", 50)  # a pid of ours, but the rank runs elsewhere
    store.set("hb/1", json.dumps(beat(1, age=2.1, host="another-host")))
    assert m.check([None] * 4).ranks == [1]


@pytest.mark.parametrize("waited, slow", [(0.7, False), (0.1, True)], ids=["starved", "straggler"])
def test_a_rank_slowed_by_waiting_for_a_cpu_is_not_a_straggler(waited, slow):
    """Rank 1 computed 0.3 s a step against the others' 0.1 s: 0.6 s more over 3 steps. If its
    process waited that long for a CPU meanwhile, the machine is loaded, the rank is not slow."""
    m, store, proc = watched(slow_steps=3)
    proc.run_wait.update({pid: 10.0 for pid in range(100, 104)})
    assert m.check([None] * 4) is None
    proc.now += 1.5
    proc.run_wait[101] = 10.0 + waited
    store.set("hb/1", json.dumps(beat(1, compute=(0.3, 0.3, 0.3))))
    fault = m.check([None] * 4)
    assert (fault is not None) == slow and (not slow or (fault.kind, fault.ranks) == ("slow", [1]))


def test_process_watch_verdicts():
    proc = FakeProc()
    watch = ProcessWatch(proc.read, proc.clock)
    proc.stat[7] = ProcessSample("S", 10)
    assert watch.look(7) == (IDLE, 0.0)
    proc.now += 2
    assert watch.look(7) == (IDLE, 2.0)
    proc.stat[7] = ProcessSample("S", 11)
    assert watch.look(7) == (WORKING, 0.0)
    proc.now += 1
    proc.stat[7] = ProcessSample("R", 11)
    assert watch.look(7) == (WORKING, 1.0)
    proc.stat[7] = ProcessSample("t", 11)
    assert watch.look(7)[0] == STOPPED
    assert watch.look(8)[0] == GONE


def test_parse_stat_counts_fields_from_the_last_parenthesis():
    line = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 300 0 0 0 17 5 0 0 20 0 3 0 100 0 0"
    assert parse_stat(line) == ProcessSample("S", 22)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="Linux only")
def test_read_proc_stat_on_real_processes():
    assert read_proc_stat(os.getpid()).state == "R"  # this process, reading its own stat
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(child.pid, signal.SIGSTOP)
        deadline = time.time() + 10
        while read_proc_stat(child.pid).state != "T" and time.time() < deadline:
            time.sleep(0.01)
        assert read_proc_stat(child.pid).state == "T"
    finally:
        child.kill()
        child.wait()
    assert read_proc_stat(child.pid) == GONE
    assert read_proc_stat(1, proc_root="/no/such/proc") == UNKNOWN


@pytest.mark.parametrize("record", [
    "not json",
    b"\xff\xfe binary",
    "[1, 2, 3]",
    json.dumps({**beat(0), "pid": "1234"}),
    json.dumps({**beat(0), "pid": True}),
    json.dumps({**beat(0), "time": "yesterday"}),
    json.dumps({k: v for k, v in beat(0).items() if k != "step"}),
    json.dumps({**beat(0), "collective": "all_reduce"}),
    json.dumps({**beat(0), "collective": {"op": "all_reduce", "dim": "dp"}}),
    json.dumps({**beat(0), "step_s": [0.1, "x"]}),
    json.dumps({**beat(0), "rank": 3}),
    json.dumps({**beat(0), "time": float("nan")}),
    json.dumps({**beat(0), "stage": -1}),
    json.dumps({**beat(0), "stage": "last"}),
], ids=["not-json", "not-utf8", "a-list", "pid-str", "pid-bool", "time-str", "no-step", "collective-str",
        "collective-keys", "step_s-str", "wrong-rank", "time-nan", "stage-negative", "stage-str"])
def test_a_bad_heartbeat_is_reported_once_and_ignored(record, capsys):
    m, store, proc = watched()
    assert m.check([None] * 4) is None
    good = m.beats[0]
    store.set("hb/0", record)
    for _ in range(3):
        assert m.check([None] * 4) is None
    assert m.beats[0] is good  # the last good heartbeat stands
    err = capsys.readouterr().err
    assert err.count("ignoring a bad store record") == 1 and "hb/0" in err


def test_a_bad_first_heartbeat_leaves_the_rank_unseen():
    m, store, proc = watched()
    store.set("hb/2", "not json")
    assert m.check([None] * 4) is None and 2 not in m.beats


def test_an_undecodable_error_report_still_names_the_culprit():
    m, store, proc = watched()
    store.set("error/0", b"\xff\xfe Connection reset by peer")
    fault = m.check([1, -9, None, None])
    assert (fault.kind, fault.ranks) == ("crash", [1])
