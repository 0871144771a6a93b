"""The live page's cost: serving a long finished run, and training with the page open.

1. **Serving.** A finished run of 10,000 steps (metrics.jsonl with the keys a 4-rank MoE run
   logs, checkpoint events, ranks.json, pipeline.json) is served by ``plait watch``'s server;
   the figure is the time from the first request to the last byte of the page's four files
   (``/``, style, script, the full ``/api/state``), cold (a fresh server reads the files) and
   warm (a second client), median of 5. With Chromium present (scripts/install_browser.sh),
   also the time from navigation until the page has drawn all 10,000 steps.
2. **Training with the page open.** The same 2-rank run, in alternating rounds: without the page,
   with the page served to a client that asks what the browser's script asks once a second, and
   (with Chromium) with headless Chromium showing the page on this same machine. The figure is
   the median step time of each (the first steps dropped) and the ratio to no page.

    .venv/bin/python bench/watch_page.py [--steps 10000] [--train-steps 80] [--rounds 4]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from plait.watch.server import PageServer  # noqa: E402
from tests.parallel.harness import write_corpus  # noqa: E402

FILES = ("/", "/style.css", "/app.js", "/api/state?rows=0&events=0")


def synthetic_run(folder: str, steps: int) -> None:
    """A finished run of ``steps`` steps with every key the page draws."""
    rng = random.Random(0)
    os.makedirs(folder, exist_ok=True)
    start = 1.8e9
    with open(os.path.join(folder, "metrics.jsonl"), "w") as fh:
        for step in range(1, steps + 1):
            record = {"step": step, "time": start + 0.3 * step, "loss": 8 * (step + 10) ** -0.2 + rng.random() * 0.05,
                      "lr": 3e-4, "grad_norm": 1 + rng.random(), "tokens": step * 65536, "tokens_per_s": 2.1e5 + rng.random() * 1e4,
                      "mfu": 0.41, "mem_gib": 61.2, "step_s": 0.3, "comm_bytes": {"dp_shard": 2.1e9, "tp": 4.4e8, "ep": 1.2e8},
                      "comm_s": 0.11, "comm_dim_s": {"dp_shard": 0.07, "tp": 0.03, "ep": 0.01}, "imbalance": 1.02, "padding": 0.01,
                      "moe_balance_loss": 0.01, "moe_z_loss": 0.001, "moe_dropped": 0.002,
                      "moe_load_imbalance": [1.1 + rng.random() * 0.2 for _ in range(8)],
                      "moe_tokens_per_expert": [[rng.randrange(900, 1100) for _ in range(8)] for _ in range(8)]}
            if step % 250 == 0:
                record.update(val_loss=record["loss"] + 0.05, val_ppl=30.0)
            fh.write(json.dumps(record) + "\n")
    with open(os.path.join(folder, "events.jsonl"), "w") as fh:
        for step in range(0, steps + 1, 50):
            fh.write(json.dumps({"time": start + 0.3 * step, "kind": "checkpoint", "rank": 0, "step": step,
                                 "detail": f"step_{step:06d}"}) + "\n")
    with open(os.path.join(folder, "ranks.json"), "w") as fh:
        json.dump({"time": start + 0.3 * steps, "attempt": 0, "nproc": 4, "hang_bound_s": 5.0, "stale_s": 2.0,
                   "ranks": [{"rank": r, "state": "done", "detail": "", "exit_code": 0, "step": steps} for r in range(4)]}, fh)
    with open(os.path.join(folder, "summary.json"), "w") as fh:
        json.dump({"steps": steps}, fh)
    with open(os.path.join(folder, "config.toml"), "w") as fh:
        fh.write(f"[train]\nsteps = {steps}\n[parallel]\nnproc = 4\ndp_shard = -1\nzero = 3\nep = 2\n[model]\nn_layers = 8\ndim = 512\n")


def load_all(server: PageServer) -> tuple[float, int]:
    """Seconds to fetch the page's four files in order, and the bytes of the state."""
    begin = time.perf_counter()
    size = 0
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    for path in FILES:
        conn.request("GET", path)
        body = conn.getresponse().read()
        size = len(body)
    conn.close()
    return time.perf_counter() - begin, size


def chromium():
    """A headless Chromium session, or None where scripts/install_browser.sh has not run."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1700"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def serving(steps: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        synthetic_run(folder, steps)
        cold, warm, size = [], [], 0
        for _ in range(5):
            server = PageServer(folder).start()
            seconds, size = load_all(server)
            cold.append(seconds)
            warm.append(load_all(server)[0])
            server.stop()
        out = {"steps": steps, "state_bytes": size, "cold_s": statistics.median(cold), "warm_s": statistics.median(warm)}
        browser = chromium()
        if browser is not None:
            drawn = []
            for _ in range(3):
                server = PageServer(folder).start()
                begin = time.perf_counter()
                browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
                while browser.execute_script("return document.body.dataset.loaded") != str(steps):
                    time.sleep(0.01)
                drawn.append(time.perf_counter() - begin)
                server.stop()
            browser.quit()
            out["browser_drawn_s"] = statistics.median(drawn)
        return out


def poller(port: int, stop: threading.Event) -> None:
    """What the page's script does: once a second, ask for what it lacks."""
    rows = events = 0
    while not stop.wait(1.0):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", f"/api/state?rows={rows}&events={events}")
            state = json.loads(conn.getresponse().read())
            conn.close()
        except (OSError, ValueError):
            continue
        rows = state["rows_from"] + len(state["rows"])
        events = state["events_from"] + len(state["events"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_once(work: str, corpus: str, mode: str, steps: int, index: int) -> float:
    """Median step time (s) of one 2-rank run with the page ``mode``: off, poller or chromium."""
    run_dir, port = os.path.join(work, f"{mode}-{index}"), free_port()
    args = ["--model.dim", "128", "--model.n_layers", "4", "--model.n_heads", "4", "--model.ffn_dim", "384",
            "--model.max_seq_len", "128", "--data.tokenizer", "bpe:512", "--data.source", corpus,
            "--data.cache_dir", os.path.join(work, "cache"), "--train.seq_len", "128", "--train.global_batch", "8",
            "--train.micro_batch", "4", "--train.steps", str(steps), "--train.eval_every", "0", "--train.sample_tokens", "0",
            "--parallel.nproc", "2", "--train.device", "cpu", "--metrics.tensorboard", "false", "--metrics.plot", "false",
            "--run.dir", run_dir]
    if mode != "off":
        args += ["--metrics.serve", str(port)]
    proc = subprocess.Popen([sys.executable, "-m", "plait", "train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    stop, browser, watcher = threading.Event(), None, None
    try:
        if mode != "off":
            while True:  # the page is up once the launcher serves it
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None:
                        raise RuntimeError(proc.stderr.read().decode())
                    time.sleep(0.1)
            if mode == "poller":
                watcher = threading.Thread(target=poller, args=(port, stop), daemon=True)
                watcher.start()
            else:
                browser = chromium()
                browser.get(f"http://127.0.0.1:{port}/")
        if proc.wait() != 0:
            raise RuntimeError(proc.stderr.read().decode())
    finally:
        stop.set()
        if browser is not None:
            browser.quit()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        times = [r["step_s"] for r in map(json.loads, fh) if "step_s" in r]
    return statistics.median(times[5:])


def training(train_steps: int, rounds: int) -> dict:
    modes = ["off", "poller"] + (["chromium"] if shutil.which("chromium") and shutil.which("chromedriver") else [])
    with tempfile.TemporaryDirectory() as work:
        corpus = write_corpus(work, n_docs=200)
        train_once(work, corpus, "off", 8, -1)  # builds the tokenizer and token cache once
        times: dict[str, list[float]] = {m: [] for m in modes}
        for index in range(rounds):
            for mode in modes if index % 2 == 0 else modes[::-1]:
                times[mode].append(train_once(work, corpus, mode, train_steps, index))
    base = statistics.median(times["off"])
    return {m: {"step_s": statistics.median(t), "ratio": statistics.median(t) / base, "runs": t} for m, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000, help="steps of the finished run served")
    parser.add_argument("--train-steps", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds; 2-rank step times on 2 shared cores vary ~10%% run to run")
    args = parser.parse_args()
    served = serving(args.steps)
    print(f"serving a finished run of {served['steps']} steps ({served['state_bytes'] / 2**20:.1f} MiB of state): "
          f"cold {served['cold_s'] * 1000:.0f} ms, warm {served['warm_s'] * 1000:.0f} ms"
          + (f", drawn in Chromium {served['browser_drawn_s'] * 1000:.0f} ms" if "browser_drawn_s" in served else ""))
    for mode, figures in training(args.train_steps, args.rounds).items():
        runs = ", ".join(f"{t * 1000:.1f}" for t in figures["runs"])
        print(f"training, page {mode:>8}: median step {figures['step_s'] * 1000:.1f} ms (runs {runs}), "
              f"ratio to no page {figures['ratio']:.3f}")


if __name__ == "__main__":
    main()
