"""Bad input: one line on stderr naming the problem, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from plait.cli import main

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib
from tests.parallel.harness import write_corpus

TINY = [
    "--model.dim", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.ffn_dim", "64",
    "--model.max_seq_len", "64", "--data.tokenizer", "bpe:300", "--train.seq_len", "16",
    "--train.global_batch", "4", "--train.micro_batch", "2", "--train.steps", "2",
    "--train.sample_tokens", "0", "--parallel.nproc", "1", "--metrics.tensorboard", "false",
    "--metrics.plot", "false", "--train.device", "cpu",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    corpus = write_corpus(str(root), n_docs=40)
    return {"root": str(root), "corpus": corpus, "cache": str(root / "cache")}


def run_cli(env, *args: str, tiny: bool = True) -> tuple[int, str]:
    """Run ``plait`` in-process; returns (exit code, stderr text)."""
    import contextlib
    import io

    run_dir = os.path.join(env["root"], "run")
    base = [*TINY, "--data.source", env["corpus"], "--data.cache_dir", env["cache"], "--run.dir", run_dir] if tiny else []
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([args[0], *base, *args[1:]]) if args[0] == "train" else main(list(args))
    return code, err.getvalue()


def assert_one_line(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit code {code}, stderr: {err}"
    assert len(lines) == 1 and lines[0].startswith("plait: error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


PLAN = ["plan", "--model.n_layers", "32", "--model.dim", "4096", "--model.n_heads", "32", "--model.ffn_dim", "11008",
        "--model.vocab_size", "32000", "--cluster.gpus", "64", "--train.global_batch", "256", "--train.seq_len", "4096"]

CASES = {
    "unknown_key": (["train", "--train.stepz", "5"], ["train.stepz", "did you mean 'train.steps'"]),
    "unknown_section": (["train", "--trian.steps", "5"], ["trian.steps", "train.steps"]),
    "wrong_type_int": (["train", "--train.steps", "ten"], ["train.steps", "not an integer"]),
    "wrong_type_bool": (["train", "--data.doc_mask", "maybe"], ["data.doc_mask", "boolean"]),
    "out_of_range": (["train", "--train.lr", "-1"], ["train.lr", "> 0"]),
    "bad_choice": (["train", "--train.schedule", "linear"], ["train.schedule", "'cosine'"]),
    "seq_len_above_limit": (["train", "--train.seq_len", "128"], ["train.seq_len = 128", "model.max_seq_len = 64"]),
    "layout_vs_world": (["train", "--parallel.nproc", "2", "--parallel.dp_shard", "3"], ["does not match the world size 2"]),
    "heads_not_divisible": (["train", "--model.n_heads", "3"], ["model.dim = 32", "model.n_heads = 3"]),
    "kv_heads_not_divisible": (["train", "--model.n_heads", "4", "--model.n_kv_heads", "3"], ["model.n_kv_heads = 3"]),
    "batch_not_divisible": (["train", "--train.global_batch", "5"], ["train.global_batch = 5"]),
    "missing_data": (["train", "--data.source", "/nonexistent/corpus.jsonl"], ["/nonexistent/corpus.jsonl"]),
    "bad_tokenizer_spec": (["train", "--data.tokenizer", "bpe:abc"], ["bpe:abc"]),
    "missing_tokenizer_file": (["train", "--data.tokenizer", "/nope/tokenizer.json"], ["/nope/tokenizer.json"]),
    "vocab_too_small": (["train", "--model.vocab_size", "10"], ["model.vocab_size = 10"]),
    "cuda_without_gpu": (["train", "--train.device", "cuda"], ["train.device"]),
    "override_without_value": (["train", "--train.steps"], ["--train.steps needs a value"]),
    "missing_config_file": (["train", "/nope/job.toml"], ["/nope/job.toml", "does not exist"]),
    "resume_without_checkpoint": (["train", "--resume"], ["no usable checkpoint"]),
    "init_from_missing": (["train", "--checkpoint.init_from", "/nope/run"], ["checkpoint.init_from", "/nope/run"]),
    "unknown_flag": (["train", "--frobnicate"], ["--frobnicate"]),
    "tp_not_dividing_heads": (["train", "--parallel.nproc", "4", "--parallel.tp", "4", "--train.global_batch", "4"],
                              ["parallel.tp = 4", "model.n_heads = 2"]),
    "tp_not_dividing_kv_heads": (["train", "--parallel.nproc", "4", "--parallel.tp", "4", "--model.n_heads", "4",
                                  "--model.n_kv_heads", "2"], ["parallel.tp = 4", "KV heads (2)"]),
    "pp_more_than_layers": (["train", "--parallel.nproc", "2", "--parallel.pp", "2"],
                            ["2 stages", "model.n_layers = 1"]),
    "too_few_micro_batches": (["train", "--parallel.nproc", "2", "--parallel.pp", "2", "--model.n_layers", "2",
                               "--train.global_batch", "2"], ["'1f1b'", "at least parallel.pp = 2", "= 1"]),
    "unknown_schedule": (["train", "--parallel.pp_schedule", "zigzag"], ["parallel.pp_schedule", "'gpipe'"]),
    "virtual_stages_without_interleaving": (["train", "--parallel.pp_virtual_stages", "2"],
                                            ["parallel.pp_virtual_stages", "one stage per rank"]),
    "bad_pp_split": (["train", "--parallel.nproc", "2", "--parallel.pp", "2", "--model.n_layers", "2",
                      "--parallel.pp_split", "1,2"], ["parallel.pp_split", "summing to model.n_layers = 2"]),
    "tied_with_tp": (["train", "--parallel.nproc", "2", "--parallel.tp", "2", "--model.tie_embeddings", "true"],
                     ["model.tie_embeddings"]),
    "profile_pipeline_without_pp": (["train", "--profile-pipeline"], ["needs parallel.pp > 1"]),
    "zero_out_of_range": (["train", "--parallel.zero", "4"], ["parallel.zero = 4", "<= 3"]),
    "ac_every_zero": (["train", "--train.ac_every", "0"], ["train.ac_every = 0", ">= 1"]),
    "compile_not_bool": (["train", "--train.compile", "yes"], ["train.compile", "boolean"]),
    "tp_with_replicated_dp": (["train", "--parallel.nproc", "4", "--parallel.tp", "2", "--parallel.zero", "1",
                              "--train.global_batch", "4", "--train.micro_batch", "2"], ["parallel.zero = 1"]),
    "bad_activation_checkpointing": (["train", "--train.activation_checkpointing", "some"],
                                     ["train.activation_checkpointing", "'selective'"]),
    "cp_world_mismatch": (["train", "--parallel.nproc", "3", "--parallel.cp", "2"],
                          ["world size 3", "parallel.tp x pp x cp = 1 x 1 x 2"]),
    "cp_seq_not_divisible": (["train", "--parallel.nproc", "2", "--parallel.cp", "2", "--train.seq_len", "18"],
                             ["train.seq_len = 18", "multiple of 4", "zigzag"]),
    "cp_contiguous_seq_not_divisible": (["train", "--parallel.nproc", "4", "--parallel.cp", "4",
                                         "--parallel.cp_shard", "contiguous", "--train.seq_len", "18",
                                         "--train.global_batch", "2", "--train.micro_batch", "2"],
                                        ["train.seq_len = 18", "multiple of 4", "contiguous"]),
    "ulysses_heads_not_divisible": (["train", "--parallel.nproc", "4", "--parallel.cp", "4", "--parallel.cp_mode",
                                     "ulysses"], ["Ulysses degree 4", "attention heads per tensor-parallel rank (2)"]),
    "hybrid_bad_ulysses_degree": (["train", "--parallel.nproc", "4", "--parallel.cp", "4", "--parallel.cp_mode",
                                   "hybrid", "--parallel.cp_ulysses", "4"], ["parallel.cp_ulysses", "strictly between 1"]),
    "bad_cp_mode": (["train", "--parallel.cp_mode", "star"], ["parallel.cp_mode", "'ulysses'"]),
    "gla_with_ring": (["train", "--parallel.nproc", "2", "--parallel.cp", "2", "--model.attention", "gla",
                       "--parallel.cp_mode", "ring"], ["parallel.cp_mode = 'ring'", "every layer of this model is GLA",
                                                       "'lasp2'"]),
    "lasp2_with_softmax_layers": (["train", "--parallel.nproc", "2", "--parallel.cp", "2", "--model.n_layers", "2", "--model.layer_pattern",
                                   "gs", "--parallel.cp_mode", "lasp2"], ["'lasp2' is for GLA layers", "softmax layers"]),
    "layer_pattern_wrong_length": (["train", "--model.layer_pattern", "ggggs"],
                                   ["model.layer_pattern = 'ggggs'", "divides model.n_layers ="]),
    "gla_head_width": (["train", "--model.attention", "gla", "--model.gla_expand_k", "0.3"],
                       ["model.gla_expand_k", "whole multiple of model.n_heads"]),
    "gla_expand_huge": (["train", "--model.attention", "gla", "--model.gla_expand_k", "1e308"],
                        ["model.gla_expand_k = 1e+308", "<= 16"]),
    "gla_expand_nan": (["train", "--model.attention", "gla", "--model.gla_expand_v", "nan"],
                       ["model.gla_expand_v = nan", "not a finite number"]),
    "gla_chunk_zero": (["train", "--model.attention", "gla", "--model.gla_chunk", "0"], ["model.gla_chunk = 0", ">= 1"]),
    "gla_plan": (["plan", "--cluster.gpu", "h100", "--cluster.gpus", "8", "--train.global_batch", "8",
                  "--train.seq_len", "512", "--model.vocab_size", "1000", "--model.n_layers", "4", "--model.dim", "256",
                  "--model.n_heads", "4", "--model.ffn_dim", "512", "--model.attention", "gla"],
                 ["plait plan models softmax attention only"]),
    "offload_params_zero1": (["train", "--memory.offload", "params", "--parallel.zero", "1"],
                             ["memory.offload = 'params'", "parallel.zero = 2 or 3", "memory.offload = 'optimizer'"]),
    "offload_unknown": (["train", "--memory.offload", "gpu"], ["memory.offload = 'gpu' is not allowed", "'params'"]),
    "offload_with_lowbw": (["train", "--memory.offload", "optimizer", "--lowbw.method", "diloco",
                            "--lowbw.inner_steps", "1"], ["memory.offload = 'optimizer'", "lowbw.method = 'diloco'"]),
    "activation_offload_too_many": (["train", "--memory.activation_offload", "5"],
                                    ["memory.activation_offload = 5", "model.n_layers = 1"]),
    "activation_offload_below_all": (["train", "--memory.activation_offload", "-2"],
                                     ["memory.activation_offload = -2", ">= -1"]),
    "activation_offload_compile": (["train", "--memory.activation_offload", "1", "--train.compile", "true"],
                                   ["memory.activation_offload", "train.compile"]),
    "recompute_fraction_above_one": (["train", "--memory.recompute_fraction", "1.5"],
                                     ["memory.recompute_fraction = 1.5", "<= 1"]),
    "recompute_fraction_nan": (["train", "--memory.recompute_fraction", "nan"],
                               ["memory.recompute_fraction = nan", "not a finite number"]),
    "recompute_fraction_with_checkpointing": (["train", "--memory.recompute_fraction", "0.5",
                                               "--train.activation_checkpointing", "full"],
                                              ["memory.recompute_fraction = 0.5", "activation_checkpointing = 'none'"]),
    "recompute_fraction_tp": (["train", "--memory.recompute_fraction", "0.5", "--parallel.nproc", "2",
                               "--parallel.tp", "2"], ["memory.recompute_fraction = 0.5", "parallel.tp = 1"]),
    "recompute_fraction_gla": (["train", "--memory.recompute_fraction", "0.5", "--model.attention", "gla"],
                               ["memory.recompute_fraction = 0.5", "softmax attention layers only"]),
    "micro_batch_word": (["train", "--train.micro_batch", "most"], ["train.micro_batch = 'most'", "an integer or auto"]),
    "micro_batch_auto_no_budget": (["train", "--train.micro_batch", "auto"],
                                   ["train.micro_batch = 'auto' on CPU", "memory.budget_gib > 0"]),
    "micro_batch_auto_pp": (["train", "--train.micro_batch", "auto", "--memory.budget_gib", "1", "--parallel.nproc",
                             "2", "--parallel.pp", "2", "--model.n_layers", "2"],
                            ["train.micro_batch = 'auto'", "parallel.pp > 1"]),
    "budget_negative": (["train", "--memory.budget_gib", "-1"], ["memory.budget_gib = -1", ">= 0"]),
    "headroom_one": (["train", "--memory.headroom", "1"], ["memory.headroom = 1", "< 1"]),
    "balanced_without_doc_mask": (["train", "--data.batching", "balanced", "--data.doc_mask", "false"],
                                  ["data.batching = 'balanced'", "needs data.doc_mask = true"]),
    "unknown_batching": (["train", "--data.batching", "sorted"], ["data.batching", "'packed', 'balanced'"]),
    "experts_not_divisible_by_ep": (["train", "--parallel.nproc", "4", "--model.moe_experts", "6",
                                     "--parallel.ep", "4", "--train.global_batch", "4", "--train.micro_batch", "1"],
                                    ["model.moe_experts = 6", "parallel.ep = 4"]),
    "top_k_above_experts": (["train", "--model.moe_experts", "2", "--model.moe_top_k", "3"],
                            ["model.moe_top_k = 3", "model.moe_experts = 2"]),
    "ep_without_experts": (["train", "--parallel.nproc", "2", "--parallel.ep", "2"], ["parallel.ep = 2", "moe_experts"]),
    "ep_not_dividing_dp_shard": (["train", "--parallel.nproc", "2", "--model.moe_experts", "4", "--parallel.ep", "4"],
                                 ["parallel.ep = 4", "dp_shard = 2"]),
    "ep_with_replicated_dp": (["train", "--parallel.nproc", "2", "--model.moe_experts", "4", "--parallel.ep", "2",
                               "--parallel.zero", "1"], ["parallel.ep = 2", "parallel.zero = 2 or 3"]),
    "moe_with_cp": (["train", "--parallel.nproc", "2", "--model.moe_experts", "4", "--parallel.cp", "2"],
                    ["moe_experts", "parallel.cp > 1"]),
    "global_scope_with_recompute": (["train", "--model.moe_experts", "4", "--train.activation_checkpointing", "full"],
                                    ["moe.balance_scope = 'global_batch'", "activation_checkpointing"]),
    "bad_reduce_dtype": (["train", "--train.reduce_dtype", "fp16"], ["train.reduce_dtype", "'bf16'"]),
    "bf16_reduce_with_fp32": (["train", "--parallel.nproc", "2", "--train.reduce_dtype", "bf16"],
                              ["train.reduce_dtype = 'bf16'", "needs train.dtype = 'bf16'"]),
    "bf16_reduce_without_fsdp": (["train", "--train.dtype", "bf16", "--train.reduce_dtype", "bf16"],
                                 ["train.reduce_dtype = 'bf16'", "does not shard"]),
    "bf16_reduce_with_ddp": (["train", "--parallel.nproc", "2", "--parallel.zero", "0", "--train.dtype", "bf16",
                              "--train.reduce_dtype", "bf16"], ["parallel.zero = 0", "does not shard"]),
    "bad_balance_scope": (["train", "--moe.balance_scope", "step"], ["moe.balance_scope", "'micro_batch'"]),
    "plan_unknown_gpu": ([*PLAN, "--cluster.gpu", "v100"], ["cluster.gpu = 'v100'", "h100-sxm"]),
    "plan_layout_not_dividing": ([*PLAN, "--cluster.gpu", "h100-sxm", "--layout", "tp=8,pp=2,dp=3,cp=1"],
                                 ["--layout", "= 48 does not divide the cluster", "cluster.gpus = 64"]),
    "plan_missing_model_fields": (["plan", "--cluster.gpu", "h100-sxm", "--cluster.gpus", "8", "--model.dim", "4096"],
                                  ["model.n_layers", "model.ffn_dim", "missing"]),
    "plan_bad_kernels": ([*PLAN, "--cluster.gpu", "h100-sxm", "--train.kernels", "bogus"],
                         ["train.kernels = 'bogus'", "'fused', 'eager'"]),
    "plan_unknown_key": ([*PLAN, "--cluster.gpu", "h100-sxm", "--cluster.nodes", "4"], ["cluster.nodes"]),
    "plan_bad_layout_key": ([*PLAN, "--cluster.gpu", "h100-sxm", "--layout", "tp=8,foo=2"], ["--layout", "foo=2"]),
    "plan_leaf_of_one_node": ([*PLAN, "--cluster.gpu", "h100-sxm", "--cluster.nodes_per_leaf", "1"],
                              ["cluster.nodes_per_leaf", "2"]),
    "plan_calibrate_needs_cpu": ([*PLAN, "--cluster.gpu", "h100-sxm", "--calibrate"], ["--calibrate", "cluster.gpu cpu"]),
    "bad_injection": (["train", "--resilience.inject", "explode:rank=1"], ["resilience.inject", "unknown fault 'explode'"]),
    "injection_rank_outside_job": (["train", "--resilience.inject", "crash:rank=3:step=2"],
                                   ["resilience.inject names rank 3", "ranks 0..0"]),
    "bad_link_bandwidth": (["train", "--comm.emulate_bandwidth", "x=abc"],
                           ["comm.emulate_bandwidth = 'x=abc'", "unknown mesh dim 'x'", "dp_replicate"]),
    "bad_link_latency": (["train", "--comm.emulate_latency", "dp=-1"], ["comm.emulate_latency = 'dp=-1'", ">= 0"]),
    "bad_nan_policy": (["train", "--resilience.on_nan", "ignore"], ["resilience.on_nan", "'rollback'"]),
    "bad_lowbw_method": (["train", "--lowbw.method", "gossip"], ["lowbw.method", "'diloco'", "'streaming'"]),
    "bad_lowbw_mix": (["train", "--lowbw.mix", "1.5"], ["lowbw.mix", "1.5"]),
    "bad_lowbw_quantize": (["train", "--lowbw.quantize", "int2"], ["lowbw.quantize", "'int4'"]),
    "lowbw_steps_not_multiple": (["train", "--lowbw.method", "diloco", "--lowbw.inner_steps", "7"],
                                 ["train.steps", "multiple of lowbw.inner_steps = 7"]),
    "generate_missing_checkpoint": (["generate", "/nope/ckpt"], ["/nope/ckpt", "does not exist"]),
    "lr_nan": (["train", "--train.lr", "nan"], ["train.lr = nan", "not a finite number"]),
    "lr_inf": (["train", "--train.lr", "inf"], ["train.lr = inf", "not a finite number"]),
    "init_std_nan": (["train", "--model.init_std", "nan"], ["model.init_std = nan", "not a finite number"]),
    "lowbw_mix_minus_inf": (["train", "--lowbw.mix", "-inf"], ["lowbw.mix = -inf", "not a finite number"]),
    "beta1_one": (["train", "--train.beta1", "1"], ["train.beta1 = 1.0", "must be < 1"]),
    "beta2_one": (["train", "--train.beta2", "1.0"], ["train.beta2 = 1.0", "must be < 1"]),
    "seed_23_digits": (["train", "--train.seed", "12345678901234567890123"],
                       ["train.seed = 12345678901234567890123", "<= 9223372036854775807"]),
    "steps_huge": (["train", "--train.steps", "99999999999999999999"], ["train.steps", "<= 2147483647"]),
    "empty_run_dir": (["train", "--run.dir="], ["run.dir = ''", "empty"]),
    "empty_data_source": (["train", "--data.source="], ["data.source = ''", "empty"]),
    "empty_cache_dir": (["train", "--data.cache_dir="], ["data.cache_dir = ''", "empty"]),
    "prompt_not_utf8": (["train", "--train.sample_prompt", "a\udcff"], ["train.sample_prompt", "not valid UTF-8"]),
    "generate_temperature_nan": (["generate", "/nope/ckpt", "--temperature", "nan"], ["--temperature", "'nan'", "finite"]),
    "generate_top_p_inf": (["generate", "/nope/ckpt", "--top-p", "inf"], ["--top-p", "'inf'", "finite"]),
    "generate_seed_huge": (["generate", "/nope/ckpt", "--seed", "12345678901234567890123"], ["--seed", "out of range"]),
    "plan_calibrate_gpus_not_a_number": (["plan", "--cluster.gpu", "cpu", "--calibrate", "--cluster.gpus", "four"],
                                         ["cluster.gpus = 'four'", "not an integer"]),
    "plan_calibrate_gpus_negative": (["plan", "--cluster.gpu", "cpu", "--calibrate", "--cluster.gpus", "-2"],
                                     ["cluster.gpus = -2", ">= 1"]),
    "plan_gpus_huge": ([*PLAN, "--cluster.gpu", "h100-sxm", "--cluster.gpus", "1000000000000"],
                       ["cluster.gpus = 1000000000000", "<= 1048576"]),
    "convert_missing_source": (["convert", "/nope/src", "/tmp/plait-never-written"], ["/nope/src"]),
    "zo_eps_zero": (["train", "--lowbw.method", "zo", "--lowbw.zo_eps", "0"], ["lowbw.zo_eps", "> 0"]),
    "zo_bits_zero": (["train", "--lowbw.method", "zo", "--lowbw.zo_bits", "0"], ["lowbw.zo_bits", ">= 1"]),
    "zo_bits_17": (["train", "--lowbw.method", "zo", "--lowbw.zo_bits", "17"], ["lowbw.zo_bits", "<= 16"]),
    "zo_with_pp": (["train", "--lowbw.method", "zo", "--parallel.nproc", "2", "--parallel.pp", "2",
                    "--model.n_layers", "2"], ["lowbw.method = 'zo' does not support parallel.pp > 1"]),
    "serve_port_out_of_range": (["train", "--metrics.serve", "70000"], ["metrics.serve", "<= 65535"]),
    "serve_host_empty": (["train", "--metrics.serve", "8000", "--metrics.host", " "], ["metrics.host"]),
    "serve_host_unknown": (["train", "--metrics.serve", "8000", "--metrics.host", "no-such-host.invalid"],
                           ["metrics.serve = 8000", "cannot listen on no-such-host.invalid:8000"]),
    "watch_port_out_of_range": (["watch", "/tmp", "--port", "70000"], ["--port 70000", "1-65535"]),
    "watch_port_not_a_number": (["watch", "/tmp", "--port", "http"], ["--port", "invalid int value"]),
    "watch_missing_run_dir": (["watch", "/nope/run"], ["/nope/run", "is not a folder"]),
    "watch_run_dir_without_metrics": (["watch", "/"], ["has no metrics.jsonl"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(env, name):
    if name == "cuda_without_gpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    args, needles = CASES[name]
    code, err = run_cli(env, *args, tiny=args[0] == "train")
    assert_one_line(code, err, *needles)
    assert not os.path.exists(os.path.join(env["root"], "run")), "a failed start wrote run.dir"
    assert not os.path.exists("/tmp/plait-never-written")


def test_empty_data_folder(env, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_cli(env, "train", "--data.source", str(empty))
    assert_one_line(code, err, str(empty))


def test_empty_documents(env, tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text('{"text": ""}\n{"text": "   "}\n')
    code, err = run_cli(env, "train", "--data.source", str(path))
    assert_one_line(code, err, str(path))


def test_bad_toml(env, tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nsteps = 3\n")
    code, err = run_cli(env, "train", str(broken))
    assert_one_line(code, err, "not valid TOML")
    typed = tmp_path / "typed.toml"
    typed.write_text('[train]\nsteps = "ten"\n')
    code, err = run_cli(env, "train", str(typed))
    assert_one_line(code, err, "train.steps", "not an integer")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[train]\nstep = 3\n")
    code, err = run_cli(env, "train", str(unknown))
    assert_one_line(code, err, "train.step", "did you mean 'train.steps'")


def test_corrupt_and_incomplete_checkpoint(env, tmp_path):
    run_dir = str(tmp_path / "run")
    code, _ = run_cli(env, "train", "--run.dir", run_dir)
    assert code == 0
    code, err = run_cli(env, "train", "--run.dir", str(tmp_path / "other"), "--checkpoint.init_from", run_dir,
                        "--model.ffn_dim", "96")
    assert_one_line(code, err, "checkpoint.init_from", "different model", "ffn_dim 64 (checkpoint) vs 96")
    folder = os.path.join(run_dir, "checkpoints", "step_000002")
    shard = next(n for n in os.listdir(folder) if n.endswith(".distcp"))
    with open(os.path.join(folder, shard), "r+b") as fh:
        fh.seek(10)
        fh.write(b"\xff\xfe\xfd")
    metrics_before = open(os.path.join(run_dir, "metrics.jsonl")).read()
    code, err = run_cli(env, "train", "--run.dir", run_dir, "--resume", "--train.steps", "4")
    assert_one_line(code, err, "corrupt", shard)
    assert open(os.path.join(run_dir, "metrics.jsonl")).read() == metrics_before
    code, err = run_cli(env, "generate", folder, tiny=False)
    assert_one_line(code, err, "corrupt")
    os.remove(os.path.join(folder, "manifest.json"))
    code, err = run_cli(env, "train", "--run.dir", run_dir, "--resume", "--train.steps", "4")
    assert_one_line(code, err, "incomplete")


def test_real_process_exit_code(env):
    """The installed entry point: exit status 2 and no traceback, from a real process."""
    proc = subprocess.run(
        [sys.executable, "-m", "plait", "train", "--train.stepz", "5"],
        capture_output=True, text=True, cwd=env["root"], timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "plait: error: unknown config key 'train.stepz' (did you mean 'train.steps'?)"


def test_toml_not_utf8(env, tmp_path):
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[train]\nsample_prompt = "café"\n'.encode("latin-1"))
    code, err = run_cli(env, "train", str(latin1))
    assert_one_line(code, err, str(latin1), "not UTF-8")
    assert not os.path.exists(os.path.join(env["root"], "run"))


def test_run_dir_is_a_file_or_below_one(env, tmp_path):
    """Checked before any rank starts: one line, and the file is left as it was."""
    plain = tmp_path / "notes.txt"
    plain.write_text("keep me\n")
    code, err = run_cli(env, "train", "--run.dir", str(plain))
    assert_one_line(code, err, f"run.dir = '{plain}' is a file")
    code, err = run_cli(env, "train", "--run.dir", str(plain / "run"))
    assert_one_line(code, err, f"run.dir = '{plain / 'run'}' lies below '{plain}', which is a file")
    code, err = run_cli(env, "train", "--data.cache_dir", str(plain / "cache"))
    assert_one_line(code, err, "data.cache_dir", "which is a file")
    assert plain.read_text() == "keep me\n"
    assert not os.path.exists(os.path.join(env["root"], "run"))


@pytest.mark.parametrize("flags, needles", [
    # 40 documents of 16-token windows hold far fewer than 4096 train windows
    (["--train.global_batch", "4096"], ["train.global_batch = 4096"]),
    (["--train.global_batch", "4096", "--parallel.nproc", "2"], ["train.global_batch = 4096"]),
    (["--train.global_batch", "4096", "--data.batching", "balanced"], ["train.global_batch x train.seq_len"]),
    # the validation split (5% of them: ~100 windows) holds fewer than one micro-batch of 128
    (["--train.global_batch", "128", "--train.micro_batch", "128"], ["validation split is too small",
                                                                     "train.micro_batch = 128"]),
])
def test_data_too_small_for_the_batches(env, flags, needles):
    """Batch checks that need the data run before any rank starts: one line, no run.dir."""
    code, err = run_cli(env, "train", *flags)
    assert_one_line(code, err, *needles)
    assert not os.path.exists(os.path.join(env["root"], "run"))


PROMPT = 'ROMEO:\n"Wherefore"\x01\x7f\\'  # a newline, quotes, control characters, a backslash


@pytest.fixture(scope="module")
def trained_run(env, tmp_path_factory):
    """A finished 2-step run whose sample prompt needs escaping in its checkpoint's config.toml."""
    run_dir = str(tmp_path_factory.mktemp("trained") / "run")
    code, err = run_cli(env, "train", "--run.dir", run_dir, "--train.sample_prompt", PROMPT)
    assert code == 0, err
    return run_dir


def test_resume_with_no_steps_left(env, trained_run):
    """Resuming a run that already reached train.steps would report success having done nothing."""
    metrics_before = open(os.path.join(trained_run, "metrics.jsonl")).read()
    for steps in ("2", "1"):
        code, err = run_cli(env, "train", "--run.dir", trained_run, "--resume", "--train.steps", steps)
        assert_one_line(code, err, "--resume", "step 2", f"train.steps = {steps}", "above 2")
    assert open(os.path.join(trained_run, "metrics.jsonl")).read() == metrics_before


def test_control_characters_survive_config_toml(env, trained_run):
    """The prompt is written as valid TOML that reads back the same, so the checkpoint stays usable."""
    folder = os.path.join(trained_run, "checkpoints", "step_000002")
    with open(os.path.join(folder, "config.toml"), "rb") as fh:
        assert tomllib.load(fh)["train"]["sample_prompt"] == PROMPT
    code, err = run_cli(env, "generate", trained_run, "--max-new-tokens", "2", tiny=False)
    assert code == 0, err


GOOD_CHAT = {"messages": [{"role": "user", "content": "Speak, friend."}, {"role": "assistant", "content": "Enter."}]}
BAD_CHAT = {
    "no_assistant_turn": ({"messages": [{"role": "user", "content": "hello"}]}, "assistant"),
    "messages_not_a_list": ({"messages": "hello"}, "messages"),
    "content_not_text": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]},
                         "content"),
    "no_messages": ({"text": "plain"}, "'messages'"),
}


def _tokens_folders(cache: str) -> list[str]:
    folder = os.path.join(cache, "tokens")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.mark.parametrize("name", sorted(BAD_CHAT))
def test_bad_chat_record_is_one_line_and_leaves_no_cache(env, tmp_path, name):
    import json

    record, needle = BAD_CHAT[name]
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in [GOOD_CHAT] * 2 + [record] + [GOOD_CHAT] * 20))
    before = _tokens_folders(env["cache"])
    code, err = run_cli(env, "train", "--data.source", str(source), "--data.format", "chat")
    assert_one_line(code, err, "chat.jsonl' line 3", needle)
    assert _tokens_folders(env["cache"]) == before  # nothing half-written
    assert not os.path.exists(os.path.join(env["root"], "run"))


@pytest.mark.parametrize("template, needle", [
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{% for m in messages %}{{ m.content ", "chat template"),
    ("{{ messages.__class__.__mro__ }}", "unsafe"),
])
def test_chat_template_that_fails_is_one_line(env, tmp_path, template, needle):
    import json

    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps(GOOD_CHAT) + "\n" for _ in range(20)))
    (tmp_path / "bad.jinja").write_text(template)
    before = _tokens_folders(env["cache"])
    code, err = run_cli(env, "train", "--data.source", str(source), "--data.format", "chat",
                        "--data.chat_template", str(tmp_path / "bad.jinja"))
    assert_one_line(code, err, needle)
    assert _tokens_folders(env["cache"]) == before


def test_unreadable_token_shard_is_one_line(env, tmp_path):
    cache = str(tmp_path / "cache")
    code, err = run_cli(env, "train", "--data.cache_dir", cache, "--run.dir", str(tmp_path / "first"))
    assert code == 0, err
    (folder,) = _tokens_folders(cache)
    with open(os.path.join(cache, "tokens", folder, "shard_00000.tokens"), "r+b") as fh:
        fh.truncate(12)
    code, err = run_cli(env, "train", "--data.cache_dir", cache)
    assert_one_line(code, err, "shard 0 does not match index.json", "to rebuild it")


def test_a_budget_below_one_micro_batch_stops_the_run(env):
    """Only the tries on the device can tell that not even one sequence fits: the run has
    started (its folder exists), and it stops with one line and exit code 2."""
    code, err = run_cli(env, "train", "--train.micro_batch", "auto", "--memory.budget_gib", "1e-6")
    shutil.rmtree(os.path.join(env["root"], "run"), ignore_errors=True)  # the other cases expect none
    assert_one_line(code, err, "train.micro_batch = 'auto'", "not even a micro-batch of 1 fits")
