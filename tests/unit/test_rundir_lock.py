"""One run per run dir: a second run into a run dir in use stops with one line, exit code 2,
and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from plait.launch.rundir import LOCK_NAME, RunDirInUse, hold_run_dir, lock_run_dir
from tests.e2e.test_bad_inputs import assert_one_line, run_cli
from tests.parallel.harness import write_corpus

HOLD = """
import fcntl, os, sys
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()} {os.uname().nodename}\\n".encode())
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/run, as a running plait run does."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield run_dir, proc
    proc.kill()
    proc.wait(timeout=10)


def test_second_lock_names_the_holder_and_release_frees_it(tmp_path):
    run_dir = str(tmp_path / "run")
    with hold_run_dir(run_dir):
        with pytest.raises(RunDirInUse, match=rf"run.dir '{run_dir}' is in use by another plait run \(pid {os.getpid()}\)"):
            lock_run_dir(run_dir)
    os.close(lock_run_dir(run_dir))  # released on leaving


def test_a_killed_runs_lock_is_free(holder):
    run_dir, proc = holder
    with pytest.raises(RunDirInUse):
        lock_run_dir(str(run_dir))
    proc.kill()
    proc.wait(timeout=10)
    os.close(lock_run_dir(str(run_dir)))


def test_second_train_into_a_busy_run_dir_is_one_line_and_writes_nothing(holder):
    run_dir, proc = holder
    pid = proc.pid
    root = str(run_dir.parent)
    env = {"root": root, "corpus": write_corpus(root, n_docs=40), "cache": os.path.join(root, "cache")}
    before = open(run_dir / LOCK_NAME).read()
    code, err = run_cli(env, "train")
    assert_one_line(code, err, f"run.dir '{run_dir}' is in use by another plait run (pid {pid})")
    assert os.listdir(run_dir) == [LOCK_NAME] and open(run_dir / LOCK_NAME).read() == before
