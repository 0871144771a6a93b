"""A rank ends with its launcher also where Linux's parent-death signal is missing (macOS):
a thread then watches its parent. (The parent-death signal itself: tests/e2e/test_signals.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.test_signals import still_running, _stat

RANK = """
import sys, time
from plait.launch import ranks
ranks._set_parent_death_signal = lambda sig: False  # as on a platform without prctl
ranks.PARENT_POLL_S = 0.1
ranks.end_with_launcher(int(sys.argv[1]))
print(__import__("os").getpid(), flush=True)
time.sleep(60)
"""

LAUNCHER = """
import os, subprocess, sys
subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid())]).wait()
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads processes from /proc")
def test_rank_without_parent_death_signal_ends_with_its_launcher():
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, RANK], stdout=subprocess.PIPE, text=True)
    rank = int(launcher.stdout.readline())
    start = _stat(rank)[19]
    try:
        time.sleep(0.5)
        assert still_running({rank: start}, within_s=0) == [rank]  # armed, and alive while its launcher is
        launcher.kill()
        launcher.wait()
        assert still_running({rank: start}, within_s=5) == [], "the rank outlived its launcher"
    finally:
        for pid in still_running({rank: start}, within_s=0):
            os.kill(pid, signal.SIGKILL)
