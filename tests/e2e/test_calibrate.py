"""`plait plan --cluster.gpu cpu --calibrate` end to end: 4 gloo ranks on this machine measure
every term, the profile loads into the planner, and a plan made with it runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_calibration_measures_every_term_and_plans_with_them(tmp_path):
    profile = tmp_path / "profile.json"
    model = ["--model.n_layers", "4", "--model.dim", "256", "--model.n_heads", "8", "--model.ffn_dim", "768",
             "--model.vocab_size", "512", "--train.global_batch", "16", "--train.seq_len", "256"]
    done = subprocess.run(
        [sys.executable, "-m", "plait", "plan", "--cluster.gpu", "cpu", "--cluster.gpus", "4", "--calibrate",
         "--cluster.profile", str(profile), *model, "--json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(profile.read_text())
    for key in ("matmul_flops", "memory_bytes_per_s", "link_bytes_per_s", "link_latency_s", "attention_efficiency",
                "op_overhead_s", "dtensor_op_s"):
        assert data[key] > 0, key
    assert data["p2p_latency_s"] > 0 and data["p2p_bytes_per_s"] > 0
    if data["cores"] < 4:  # ranks share cores: the slowdown was measured
        assert data["sharing_slowdown"] >= 1.0

    from plait.plan.hardware import load_profile

    gpu, link = load_profile(str(profile))
    assert gpu.core_share == min(1.0, data["cores"] / 4)
    assert link.partial_as_all_reduce and link.p2p_bytes_per_s == data["p2p_bytes_per_s"]
    layouts = json.loads(done.stdout[done.stdout.index("{"):])["layouts"]
    assert layouts and all(row["step_time_s"] > 0 for row in layouts)
