"""The live page in a real browser: headless Chromium (Debian's package, installed by
scripts/install_browser.sh from `make test`) driven by Selenium through chromedriver.

A 4-rank run serves its page (``--metrics.serve``); the page must show the steps and the loss
curve advancing, turn rank 2's row to "hung" within the monitor's detection bound once rank 2
is stopped from outside (SIGSTOP), then show the restarted attempt. Screenshots of each moment
go to ``$PLAIT_TEST_OUTPUT/live_page`` (default: test-output/ in the repository).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.e2e.test_bad_inputs import TINY
from tests.e2e.test_signals import descendants, kill_all
from tests.parallel.harness import write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUTPUT = os.path.join(os.environ.get("PLAIT_TEST_OUTPUT", os.path.join(ROOT, "test-output")), "live_page")
HANG_S = 5.0  # resilience.hang_s below: the detection bound is max(hang_s, 3 x step time), steps take < 1 s
PAGE_POLL_S = 1.0  # the page asks for new state once a second (plait/watch/assets/app.js)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver: run scripts/install_browser.sh")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1700"):
        options.add_argument(arg)
    session = webdriver.Chrome(service=Service(driver), options=options)
    yield session
    session.quit()


def wait_for(what: str, check, timeout_s: float):
    """Poll ``check()`` until it returns something truthy; fail naming ``what`` after the timeout."""
    deadline = time.time() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.time() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.1)


def page_value(browser, script: str):
    return browser.execute_script(script)


STEP = "const t = document.getElementById('step').textContent; return /^[0-9]+$/.test(t) ? Number(t) : null;"
LOSS_POINTS = "return Number(document.getElementById('chart-loss').dataset.points || 0);"


def row(browser, rank: int) -> dict | None:
    return page_value(browser, f"""
        const tr = document.getElementById('rank-{rank}');
        if (!tr) return null;
        return {{state: tr.dataset.state, detail: tr.children[9].textContent, pid: Number(tr.children[8].textContent)}};""")


def shoot(browser, name: str) -> None:
    os.makedirs(OUTPUT, exist_ok=True)
    browser.save_screenshot(os.path.join(OUTPUT, name))


def test_page_follows_a_run_and_names_a_frozen_rank(tmp_path, browser):
    port, run_dir = free_port(), str(tmp_path / "run")
    args = [*TINY, "--data.source", write_corpus(str(tmp_path), n_docs=40), "--data.cache_dir", str(tmp_path / "cache"),
            "--run.dir", run_dir, "--parallel.nproc", "4", "--train.global_batch", "8", "--train.steps", "100000", "--train.eval_every", "10",
            "--train.eval_batches", "1", "--checkpoint.every", "5", "--metrics.serve", str(port),
            "--resilience.hang_s", str(HANG_S), "--resilience.max_restarts", "1"]
    log_path = tmp_path / "launcher.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "plait", "train", *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}/"
    try:
        def serving():
            assert proc.poll() is None, log_path.read_text()
            try:
                return urllib.request.urlopen(url, timeout=2).status == 200
            except OSError:
                return False
        wait_for("the page to be served", serving, 240)
        browser.get(url)

        # The step counter and the loss chart advance.
        first = wait_for("a training step on the page", lambda: page_value(browser, STEP), 240)
        points = page_value(browser, LOSS_POINTS)
        wait_for("the step counter to advance", lambda: (page_value(browser, STEP) or 0) > first, 60)
        wait_for("the loss chart to grow", lambda: page_value(browser, LOSS_POINTS) > points, 60)
        # "slow" is a verdict too (a loaded machine may earn one); it does not stop the run.
        running = ("healthy", "slow")
        wait_for("every rank running", lambda: all((row(browser, r) or {}).get("state") in running for r in range(4)), 60)
        shoot(browser, "1-training.png")

        # Rank 2 stopped from outside: its row turns "hung" within the detection bound.
        pid = row(browser, 2)["pid"]
        assert pid in descendants(proc.pid), "the page's pid for rank 2 is not a process of this run"
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.time()
        hung = wait_for("rank 2's row to turn hung", lambda: (r := row(browser, 2)) and r["state"] == "hung" and r, 60)
        took = time.time() - stopped_at
        assert took <= HANG_S + PAGE_POLL_S, f"the page showed the hang {took:.1f} s after SIGSTOP"
        assert hung["detail"].startswith("rank 2: no heartbeat") and "stopped" in hung["detail"], hung  # the verdict
        assert all(row(browser, r)["state"] != "hung" for r in (0, 1, 3)), "a healthy rank was named"
        assert page_value(browser, "return document.getElementById('status').textContent") == "stalled"
        events = page_value(browser, "return [...document.querySelectorAll('#events tbody tr')].map(tr => [tr.dataset.kind, tr.textContent])")
        assert any(kind == "hang" and "rank 2" in text for kind, text in events), events
        shoot(browser, "2-rank-2-hung.png")

        # The supervisor restarts the job from its last checkpoint; the page follows.
        wait_for("the restarted attempt", lambda: page_value(browser, "return document.getElementById('attempt').textContent") == "1"
                 and all((row(browser, r) or {}).get("state") in ("restarted", "slow") for r in range(4)), 180)
        resumed = page_value(browser, STEP)
        wait_for("training to go on after the restart", lambda: (page_value(browser, STEP) or 0) > resumed, 60)
        events = page_value(browser, "return [...document.querySelectorAll('#events tbody tr')].map(tr => tr.dataset.kind)")
        assert "restart" in events and "resume" in events, events
        shoot(browser, "3-restarted.png")
    finally:
        procs = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        kill_all(procs)
