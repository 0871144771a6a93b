"""The CLI end to end on a tiny job: train, metrics and plots, generate, convert both ways."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random

import pytest
import torch

from plait.cli import main
from tests.e2e.test_bad_inputs import TINY
from tests.parallel.harness import WORDS, roll_back, write_corpus

KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "mem_gib", "imbalance", "padding"}


def cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(str(root), n_docs=60)
    run_dir = str(root / "run")
    args = [*TINY, "--data.source", corpus, "--data.cache_dir", str(root / "cache"), "--run.dir", run_dir,
            "--train.steps", "6", "--train.eval_every", "3", "--metrics.plot", "true",
            "--metrics.tensorboard", "true", "--train.sample_tokens", "8"]
    code, out = cli("train", *args)
    assert code == 0
    return {"root": root, "run": run_dir, "out": out, "args": args}


def test_metrics_file_plots_and_sample(trained):
    rows = [json.loads(line) for line in open(os.path.join(trained["run"], "metrics.jsonl"))]
    assert rows[0]["step"] == 0 and "val_loss" in rows[0]  # validation before training
    steps = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for row in steps:
        assert KEYS <= set(row), row
        assert row["tokens"] == row["step"] * 4 * 16 and row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
        assert row["imbalance"] >= 1.0 and row["padding"] == 0.0  # packed windows are full
    assert {r["step"] for r in rows if "val_loss" in r} == {0, 3, 6}
    assert os.path.getsize(os.path.join(trained["run"], "loss_curve.png")) > 1000
    assert os.path.getsize(os.path.join(trained["run"], "memory.png")) > 1000  # the memory breakdown
    assert "activations kept for backward" in trained["out"]
    assert os.listdir(os.path.join(trained["run"], "tensorboard"))
    summary = json.load(open(os.path.join(trained["run"], "summary.json")))
    assert summary["steps"] == 6 and summary["first_val_loss"] == rows[0]["val_loss"]
    assert "plait: sample: " in trained["out"]


def test_print_config_shows_overrides(trained):
    code, out = cli("train", *trained["args"], "--print-config")
    assert code == 0 and "steps = 6" in out and "[parallel]" in out


def test_generate_from_run_dir(trained):
    code, out = cli("generate", trained["run"], "--prompt", "the king", "--max-new-tokens", "5", "--temperature", "0")
    assert code == 0 and out.startswith("the king")
    again = cli("generate", trained["run"], "--prompt", "the king", "--max-new-tokens", "5", "--temperature", "0")[1]
    assert again == out  # greedy decoding is deterministic


def test_convert_round_trip_keeps_logits(trained, tmp_path):
    from plait.checkpoint.hf import from_pretrained
    from plait.checkpoint.store import latest_checkpoint, load_model_checkpoint

    ckpt = latest_checkpoint(trained["run"])
    hf_dir, back = str(tmp_path / "hf"), str(tmp_path / "back")
    assert cli("convert", ckpt, hf_dir)[0] == 0
    assert cli("convert", hf_dir, back)[0] == 0
    original, _ = load_model_checkpoint(ckpt)
    ids = torch.randint(0, original.cfg.vocab_size, (2, 10))
    with torch.no_grad():
        want = original(ids)
        torch.testing.assert_close(from_pretrained(hf_dir)(ids), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(load_model_checkpoint(back)[0](ids), want, rtol=0, atol=1e-5)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["convert", hf_dir, back]) == 2  # never overwrites a checkpoint
    assert "already exists" in err.getvalue()


def test_resume_continues_metrics(trained):
    code, _ = cli("train", *trained["args"], "--train.steps", "8", "--resume")
    assert code == 0
    rows = [json.loads(line) for line in open(os.path.join(trained["run"], "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["step"] > 0] == list(range(1, 9))


def test_profile_pipeline_writes_gantt_and_bubble(trained, tmp_path):
    run_dir = str(tmp_path / "pp")
    args = [a if a != trained["run"] else run_dir for a in trained["args"]]
    code, out = cli("train", *args, "--parallel.nproc", "2", "--parallel.pp", "2", "--model.n_layers", "2",
                    "--train.steps", "2", "--profile-pipeline")
    assert code == 0
    assert os.path.getsize(os.path.join(run_dir, "pipeline_gantt.png")) > 5000
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = [r for r in rows if r["step"] > 0]
    assert all(0 < r["bubble"] < 1 and r["comm_bytes"]["pp"] > 0 for r in steps)


def test_balanced_batching_on_a_long_tailed_corpus(tmp_path):
    rng = random.Random(0)
    corpus = tmp_path / "long_tail.jsonl"
    with open(corpus, "w") as fh:  # 2 to 300 words, median ~20: many short documents, a few long
        for _ in range(80):
            n = int(min(300, max(2, rng.lognormvariate(3.0, 1.0))))
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(n)) + "."}) + "\n")
    run_dir = str(tmp_path / "run")
    args = [*TINY, "--data.source", str(corpus), "--data.cache_dir", str(tmp_path / "cache"), "--run.dir", run_dir,
            "--train.steps", "4", "--data.batching", "balanced", "--checkpoint.every", "2"]

    def logged() -> list[dict]:
        rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        return [r for r in rows if r["step"] > 0]

    assert cli("train", *args)[0] == 0
    steps = logged()
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for row in steps:
        assert 1.0 <= row["imbalance"] < 2.0 and 0.0 <= row["padding"] < 1.0, row
        assert row["loss"] == row["loss"]  # not NaN: padding and piece ends score nothing
    roll_back(run_dir, 2)  # the loader's position goes through the checkpoint too
    assert cli("train", *args, "--resume")[0] == 0
    assert [(r["loss"], r["padding"]) for r in logged()] == [(r["loss"], r["padding"]) for r in steps]


def test_moe_run_logs_expert_figures_and_draws_the_load_map(tmp_path):
    corpus = write_corpus(str(tmp_path), n_docs=40)
    run_dir = str(tmp_path / "run")
    code, out = cli("train", *TINY, "--data.source", corpus, "--data.cache_dir", str(tmp_path / "cache"),
                    "--run.dir", run_dir, "--train.steps", "3", "--metrics.plot", "true",
                    "--model.moe_experts", "4", "--model.moe_top_k", "2", "--model.moe_dispatch", "capacity",
                    "--model.moe_capacity_factor", "0.5")
    assert code == 0
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in line]
    assert len(rows) == 3
    for row in rows:
        load = row["moe_tokens_per_expert"]
        assert len(load) == 1 and len(load[0]) == 4
        # 2 micro-batches of 2 x 16 tokens, 2 assignments each: all counted, some dropped.
        assert sum(load[0]) == 2 * 2 * 16 * 2
        assert 0 < row["moe_dropped"] < 1 and row["moe_load_imbalance"][0] >= 1.0
        assert row["moe_balance_loss"] > 0 and row["moe_z_loss"] > 0
    assert os.path.getsize(os.path.join(run_dir, "expert_load.png")) > 1000
    assert "expert-load heat map" in out
