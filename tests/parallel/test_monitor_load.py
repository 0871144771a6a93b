"""The monitor on a loaded machine: a healthy 4-rank tp2 x pp2 job under 3 busy processes per
core is never blamed (no fault event, the quiet losses), even while a foreign writer puts bad
records into the monitor's store; a rank stopped with SIGSTOP under the same load is still
named within resilience.hang_s.

The load starts once every rank has started (its watchdog beats): what is tested is the
monitor's judgement while it watches, and four ranks importing torch on a starved machine
would only make the test slow. The quiet reference is the same model on one process (the
parity harness holds tp2 x pp2 to it within RTOL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from plait.launch import launch_training, supervisor
from plait.launch.supervisor import JobFailed
from plait.resilience.events import read_events
from plait.resilience.monitor import Monitor
from tests.parallel.harness import RTOL, job, write_corpus

FAULTS = ("crash", "hang", "slow", "nan", "restart")
LAYOUT = {"parallel.nproc": 4, "parallel.tp": 2, "parallel.pp": 2, "parallel.pp_schedule": "1f1b",
          "parallel.dp_shard": -1, "model.n_layers": 2, "train.steps": 4, "train.eval_every": 0,
          "checkpoint.every": 2}


def losses_of(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return {r["step"]: r["loss"] for r in map(json.loads, fh) if "loss" in r}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("load"))
    write_corpus(folder)
    return folder


@pytest.fixture(scope="module")
def quiet(workdir):
    cfg = job(workdir, "quiet", **{k: v for k, v in LAYOUT.items() if not k.startswith("parallel.")})
    launch_training(cfg)
    return losses_of(cfg.run.dir)


class Load(threading.Thread):
    """3 busy-looping processes per core, started once every rank of the job in ``run_dir``
    has started; ``stop`` kills them."""

    def __init__(self, run_dir: str, ranks: int = 4):
        super().__init__(daemon=True)
        self.run_dir, self.ranks, self.busy, self.done = run_dir, ranks, [], threading.Event()

    def run(self):
        while not self.done.wait(0.05):
            if sum(e["kind"] == "start" for e in read_events(self.run_dir)) >= self.ranks:
                count = 3 * (os.cpu_count() or 1)
                self.busy += [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
                return

    def stop(self):
        self.done.set()
        self.join()
        for proc in self.busy:
            proc.kill()
        for proc in self.busy:
            proc.wait()


@pytest.fixture
def load():
    loads: list[Load] = []

    def under_load(run_dir: str) -> Load:
        loads.append(Load(run_dir))
        loads[-1].start()
        return loads[-1]

    try:
        yield under_load
    finally:
        for started in loads:
            started.stop()


class ForeignWriter(threading.Thread):
    """Another client of the monitor's store that keeps writing records no rank would."""

    BAD = {"hb/0": "not json", "hb/1": json.dumps({"time": "now", "pid": "1", "step": None}),
           "hb/3": json.dumps([1, 2]), "error/2": b"\xff\xfe"}

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.stop, self.writes = port, threading.Event(), 0

    def run(self):
        client = dist.TCPStore("127.0.0.1", self.port, is_master=False, timeout=timedelta(seconds=10))
        while not self.stop.wait(0.2):
            try:
                for key, value in self.BAD.items():
                    client.set(key, value)
                self.writes += 1
            except Exception:  # the attempt's store is gone: the job is over
                return


def test_a_loaded_healthy_job_is_never_blamed_despite_bad_store_records(workdir, quiet, load, monkeypatch, capfd):
    """Steps 1-4 and their two checkpoint saves run under load while a foreign writer puts bad
    records into the monitor's store: no fault, the job finishes with the quiet losses."""
    writers: list[ForeignWriter] = []

    class MonitorWithForeignWriter(Monitor):
        def __init__(self, store, *args, **kwargs):
            super().__init__(store, *args, **kwargs)
            writers.append(ForeignWriter(store.port))
            writers[-1].start()

    monkeypatch.setattr(supervisor, "Monitor", MonitorWithForeignWriter)
    cfg = job(workdir, "loaded", **LAYOUT)
    busy = load(cfg.run.dir)
    try:
        launch_training(cfg)
    finally:
        for writer in writers:
            writer.stop.set()
    assert busy.busy, "the job ended before the load started"
    events = read_events(cfg.run.dir)
    assert [e for e in events if e["kind"] in FAULTS] == [] and events[-1]["kind"] == "done"
    assert losses_of(cfg.run.dir) == pytest.approx(quiet, rel=RTOL)
    assert len(writers) == 1 and writers[0].writes >= 3  # the bad records were there while it ran
    assert capfd.readouterr().err.count("ignoring a bad store record") == 3  # once per bad heartbeat key


def test_a_stopped_rank_under_load_is_named_within_the_bound(workdir, load):
    cfg = job(workdir, "loaded_sigstop", **{**LAYOUT, "train.steps": 40, "resilience.max_restarts": 0})
    run_dir, failed = cfg.run.dir, []
    busy = load(run_dir)

    def run():
        try:
            launch_training(cfg)
        except JobFailed as exc:  # max_restarts = 0: the first fault ends the job
            failed.append(exc)

    runner = threading.Thread(target=run)
    runner.start()
    try:
        metrics = os.path.join(run_dir, "metrics.jsonl")
        while not (os.path.isfile(metrics) and '"step": 2' in open(metrics).read()):
            assert runner.is_alive(), "the job ended before the fault"
            time.sleep(0.05)
        assert busy.busy, "the load had not started"
        pid = next(e["pid"] for e in read_events(run_dir) if e["kind"] == "start" and e["rank"] == 2)
        stopped_at = time.time()
        os.kill(pid, signal.SIGSTOP)
    finally:
        runner.join()
    assert failed, "the job finished with a rank stopped"
    faults = [e for e in read_events(run_dir) if e["kind"] in FAULTS]
    assert faults[0]["time"] >= stopped_at, f"a false alarm under load: {faults[0]}"
    assert (faults[0]["kind"], faults[0]["ranks"], faults[0].get("hang")) == ("hang", [2], "frozen"), faults[0]
    assert faults[0]["time"] - stopped_at <= cfg.resilience.hang_s, faults[0]
