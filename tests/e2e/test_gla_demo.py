"""configs/gla_demo.toml end to end: the GLA model learns the demo corpus (validation loss down
by at least 30%) and ``plait generate`` samples from its checkpoint through the O(1) state.

The run is the config as shipped, on one rank with shorter windows and fewer steps so it fits
in the suite; the full 250-step run is in BENCHMARKS.md."""

from __future__ import annotations

import json
import os

from tests.e2e.test_cli import cli

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "gla_demo.toml")


def test_gla_demo_learns_and_generates(tmp_path):
    run_dir = str(tmp_path / "run")
    code, _ = cli("train", CONFIG, "--run.dir", run_dir, "--data.cache_dir", str(tmp_path / "cache"),
                  "--parallel.nproc", "1", "--train.steps", "100", "--train.seq_len", "128",
                  "--train.eval_every", "100", "--metrics.plot", "false", "--metrics.progress", "false",
                  "--train.sample_tokens", "0")
    assert code == 0
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] <= 0.7 * val[0], val
    code, out = cli("generate", run_dir, "--prompt", "ROMEO:", "--max-new-tokens", "30", "--seed", "1")
    assert code == 0 and out.startswith("ROMEO:")
    assert any(c.isalpha() for c in out[len("ROMEO:"):]), out
