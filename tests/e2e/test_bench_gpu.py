"""bench/gpu.py: the CPU smoke run prints every report line and sane figures; without a GPU
the full run refuses with one line and exit status 2."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.e2e.bench_script import run_bench

KEYS = ["device", "torch", "params", "tokens/step", "step time median", "step time mean", "tokens/s",
        "TFLOP/s per GPU", "MFU", "peak memory"]


def run(*args: str) -> subprocess.CompletedProcess:
    return run_bench("gpu.py", *args, timeout=120)


def report(stdout: str) -> dict[str, str]:
    lines = [line.split(": ", 1) for line in stdout.splitlines() if ": " in line]
    return {key: value for key, value in lines}


def test_smoke_run_reports_figures(tmp_path):
    path = tmp_path / "gpu.json"
    proc = run("--smoke", "--steps", "3", "--warmup", "1", "--json", str(path))
    assert proc.returncode == 0, proc.stderr
    lines = report(proc.stdout)
    for key in KEYS:
        assert key in lines, f"missing '{key}: ...' in\n{proc.stdout}"
    assert float(lines["tokens/s"].replace(",", "")) > 0
    figures = json.loads(path.read_text())
    assert figures["mode"] == "smoke" and figures["timed_steps"] == 3
    assert figures["tokens_per_s"] > 0
    assert 0 < figures["mfu"] < 1
    assert figures["tokens_per_step"] == figures["global_batch"] * figures["seq_len"] == figures["micro_batch"] * figures["seq_len"]
    assert figures["step_s_median"] > 0 and figures["step_s_mean"] > 0
    assert figures["tflops_per_gpu"] > 0 and figures["peak_mem_gib"] > 0


def test_smoke_run_tries_micro_batches_with_activation_offload(tmp_path):
    """The GPU check of the memory issue (bench/gpu_memory.sh), small on CPU: the trainer picks
    the micro-batch by trial under a budget, with every block's activations offloaded."""
    path = tmp_path / "gpu.json"
    proc = run("--smoke", "--steps", "2", "--warmup", "1", "--micro-batch", "auto", "--global-batch", "8",
               "--budget-gib", "0.05", "--activation-offload", "-1", "--json", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "chosen by trial" in report(proc.stdout)["tokens/step"]
    figures = json.loads(path.read_text())
    assert figures["micro_batch_asked"] == "auto" and 8 % figures["micro_batch"] == 0
    assert figures["activation_offload"] == -1 and figures["tokens_per_step"] == 8 * figures["seq_len"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_full_run_without_gpu_exits_2():
    proc = run("--steps", "1", "--warmup", "0")
    assert proc.returncode == 2
    out = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(out) == 1 and "GPU" in out[0] and "--smoke" in out[0], out
