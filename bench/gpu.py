"""Single-GPU training throughput of a Llama-3.2-1B-shaped model through plait's own trainer.

``plait train`` itself runs (``run_training``, one rank): plait's Llama (16 layers, dim 2048,
32 heads, 8 KV heads, FFN 8192, vocab 128256, tied embeddings, llama3 RoPE scaling) at seq
4096 on real packed documents (a generated corpus of documents of very different lengths, BPE
tokenizer, document masks: the per-document attention operator), bf16 (at one rank: fp32
weights with bf16 autocast; plait has no FSDP over one rank), each block compiled, AdamW with
clipping at 1.0. The trainer's own step times (metrics.jsonl) give the figures; the first
``--warmup`` steps (compilation, allocator) are not timed. ``--no-doc-mask`` runs the same
windows as one causal document per row, the comparison the fused-attention issue asks for.

MFU = flops_per_token(model, seq) x tokens/s / peak, with plait's FLOP count
6·N_matmul + 12·L·s·h (matmul weights including the output layer; attention is not halved for
causality, nor reduced for documents) against the GPU's dense bf16 peak. tokens/s = tokens per
step / mean step time.

    .venv/bin/python bench/gpu.py [--steps 30] [--warmup 5] [--micro-batch 1|auto] [--global-batch N]
                                  [--seq-len 4096] [--no-compile] [--no-doc-mask]
                                  [--activation-checkpointing MODE] [--activation-offload N]
                                  [--offload MODE] [--budget-gib G] [--peak-tflops T] [--json PATH]

``--micro-batch auto`` lets the trainer try micro-batches on the GPU before training (issue 21's
check, with and without ``--activation-offload -1``); activation offload needs ``--no-compile``.
    .venv/bin/python bench/gpu.py --smoke     # tiny model on CPU, a few seconds (the tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.parallel.harness

from plait.config import ModelConfig, build_config  # noqa: E402
from plait.launch import preflight  # noqa: E402
from plait.models.llama import Llama, count_params  # noqa: E402
from plait.train.metrics import flops_per_token  # noqa: E402
from plait.train.trainer import run_training  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, matched in order against the device name.
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
]
SMOKE_PEAK_TFLOPS = 1.0  # nominal CPU figure, only so the smoke run prints an MFU line


def llama_1b(seq_len: int) -> ModelConfig:
    """The Llama-3.2-1B shape."""
    return ModelConfig(
        vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
        max_seq_len=max(seq_len, 8192), rope_theta=500000.0, rope_scaling="llama3", rope_factor=32.0,
        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_seq_len=8192,
        norm_eps=1e-5, tie_embeddings=True,
    )


def tiny(seq_len: int) -> ModelConfig:
    """Same family, small enough for a CPU smoke run."""
    return ModelConfig(
        vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=max(seq_len, 64),
        rope_theta=500000.0, rope_scaling="llama3", rope_factor=32.0, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0, rope_original_max_seq_len=8192, norm_eps=1e-5, tie_embeddings=True,
    )


def lookup_peak(name: str) -> float | None:
    for key, peak in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30; smoke 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; smoke 1)")
    parser.add_argument("--micro-batch", default="1",
                        help="sequences per forward/backward, or auto: the largest that fits, by trial (default 1)")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="sequences per step (default: the micro-batch; 32 with --micro-batch auto)")
    parser.add_argument("--activation-offload", type=int, default=0,
                        help="memory.activation_offload: the first N blocks' activations to host memory (-1: all)")
    parser.add_argument("--offload", choices=["none", "optimizer", "params"], default="none", help="memory.offload")
    parser.add_argument("--budget-gib", type=float, default=0.0,
                        help="memory.budget_gib for --micro-batch auto (0: the GPU's memory; required with --smoke)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 4096; smoke 64)")
    parser.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile each block (default on; off in --smoke)")
    parser.add_argument("--activation-checkpointing", choices=["none", "full", "selective", "op"], default="none")
    parser.add_argument("--doc-mask", action=argparse.BooleanOptionalAction, default=True,
                        help="packed documents kept apart (default), or each row one causal document")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                        help="train.dtype (default bf16: at one rank, fp32 weights with bf16 autocast)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="bf16 peak of the device; default looked up from the GPU name")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few seconds")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (3 if args.smoke else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    args.seq_len = args.seq_len if args.seq_len is not None else (64 if args.smoke else 4096)
    args.compile = args.compile if args.compile is not None else not args.smoke
    if args.micro_batch != "auto":
        if not args.micro_batch.isdigit():
            parser.error("--micro-batch must be an integer >= 1 or auto")
        args.micro_batch = int(args.micro_batch)
    if args.global_batch is None:
        args.global_batch = 32 if args.micro_batch == "auto" else args.micro_batch
    for name in ("steps", "seq_len", "global_batch") + (() if args.micro_batch == "auto" else ("micro_batch",)):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def job_values(args: argparse.Namespace, model_cfg: ModelConfig, folder: str, device: str, peak: float) -> dict:
    """plait's own config for the benchmark run: the model, real packed documents from the
    generated corpus, bf16, compiled blocks, one rank."""
    values = {f"model.{f.name}": getattr(model_cfg, f.name) for f in dataclasses.fields(model_cfg)}
    values.update({
        "run.dir": os.path.join(folder, "run"), "data.source": os.path.join(folder, "corpus.jsonl"),
        "data.tokenizer": f"bpe:{min(model_cfg.vocab_size, 1024)}", "data.cache_dir": os.path.join(folder, "cache"), "data.val_fraction": 0.0,
        "data.doc_mask": args.doc_mask,
        "train.steps": args.warmup + args.steps, "train.seq_len": args.seq_len, "train.micro_batch": args.micro_batch,
        "train.global_batch": args.global_batch, "train.lr": 3e-4, "train.warmup_steps": 0, "train.grad_clip": 1.0,
        "train.dtype": args.dtype, "train.compile": args.compile, "train.device": device,
        "train.activation_checkpointing": args.activation_checkpointing, "train.seed": args.seed,
        "train.sample_tokens": 0, "train.eval_every": 0,
        "metrics.peak_tflops": peak, "metrics.tensorboard": False, "metrics.plot": False, "metrics.progress": False,
        "parallel.nproc": 1, "memory.activation_offload": args.activation_offload, "memory.offload": args.offload,
        "memory.budget_gib": args.budget_gib,
    })
    return values


def write_documents(folder: str, tokens: int, seed: int) -> None:
    """A JSONL corpus of documents of very different lengths (the parity harness's), enough for
    ``tokens`` tokens of packed windows."""
    from tests.parallel.harness import write_corpus

    write_corpus(folder, n_docs=max(120, tokens // 150), seed=seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU (none found); use --smoke for the CPU smoke run", file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda":
        device_name = torch.cuda.get_device_name(0)
        peak = args.peak_tflops or lookup_peak(device_name)
        if peak is None:
            print(f"unknown peak for '{device_name}': pass --peak-tflops (dense bf16 TFLOP/s)", file=sys.stderr)
            return 2
    else:
        device_name = f"CPU ({torch.get_num_threads()} threads)"
        peak = args.peak_tflops or SMOKE_PEAK_TFLOPS
    model_cfg = (tiny if args.smoke else llama_1b)(args.seq_len)
    seq = args.seq_len
    tokens_per_step = args.global_batch * seq
    with tempfile.TemporaryDirectory() as folder:
        write_documents(folder, tokens_per_step * (args.warmup + args.steps + 2), args.seed)
        cfg = build_config(values=job_values(args, model_cfg, folder, device, peak))
        cfg = preflight(cfg, 1)  # the tokenizer and token cache, before timing anything
        warm_begin = time.perf_counter()
        result = run_training(cfg)
        total_s = time.perf_counter() - warm_begin
        with open(os.path.join(cfg.run.dir, "metrics.jsonl")) as fh:
            rows = [json.loads(line) for line in fh]
        with open(os.path.join(cfg.run.dir, "config.toml"), "rb") as fh:
            batch = tomllib.load(fh)["train"]["micro_batch"]  # what --micro-batch auto chose
    steps = {r["step"]: r for r in rows if "loss" in r and "step_s" in r}
    timed = [steps[s] for s in sorted(steps) if s > args.warmup]
    times = [r["step_s"] for r in timed]
    mean_s, median_s = statistics.fmean(times), statistics.median(times)
    tokens_per_s = tokens_per_step / mean_s
    fpt = flops_per_token(model_cfg, seq)
    achieved_tflops = fpt * tokens_per_s / 1e12
    mfu = achieved_tflops / peak
    mem_gib = max(r["mem_gib"] for r in timed)
    mem_kind = "torch.cuda.max_memory_allocated" if device == "cuda" else "process peak RSS"
    n_params = count_params_of(model_cfg)
    final_loss = result.losses[max(result.losses)]
    precision = "bf16 autocast, fp32 weights (plait at one rank)" if args.dtype == "bf16" else "fp32"
    documents = "packed documents, document masks" if args.doc_mask else "packed windows, one causal document per row"
    figures = {
        "device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda if device == "cuda" else None,
        "mode": "smoke" if args.smoke else "full", "model": "tiny (smoke)" if args.smoke else "Llama-3.2-1B shape",
        "params": n_params, "dtype": precision, "compile": "per block" if args.compile else "off",
        "activation_checkpointing": args.activation_checkpointing, "doc_mask": args.doc_mask,
        "micro_batch": batch, "micro_batch_asked": args.micro_batch, "global_batch": args.global_batch,
        "activation_offload": args.activation_offload, "offload": args.offload, "seq_len": seq, "tokens_per_step": tokens_per_step, "warmup_steps": args.warmup,
        "timed_steps": len(timed), "run_s": total_s, "step_s_median": median_s, "step_s_mean": mean_s,
        "tokens_per_s": tokens_per_s, "flops_per_token": fpt, "tflops_per_gpu": achieved_tflops, "peak_tflops": peak,
        "mfu": mfu, "peak_mem_gib": mem_gib, "final_loss": final_loss,
    }
    lines = [
        ("device", device_name),
        ("torch", torch.__version__ + (f" (CUDA {torch.version.cuda})" if device == "cuda" else "")),
        ("model", f"{figures['model']}: {model_cfg.n_layers} layers, dim {model_cfg.dim}, {model_cfg.n_heads} heads, "
                  f"{model_cfg.n_kv_heads} KV heads, FFN {model_cfg.ffn_dim}, vocab {model_cfg.vocab_size}, tied embeddings"),
        ("params", f"{n_params:,} ({n_params / 1e9:.3f} B)"),
        ("setup", f"plait's trainer: {precision}, compile {figures['compile']}, activation checkpointing "
                  f"{args.activation_checkpointing}, AdamW, grad clip 1.0, {documents}"),
        ("tokens/step", f"{tokens_per_step:,} ({args.global_batch} x {seq}, micro-batch {batch}"
                        + (" chosen by trial" if args.micro_batch == "auto" else "") + ")"),
        ("memory options", f"offload {args.offload}, activation offload {args.activation_offload}"),
        ("steps", f"{len(timed)} timed after {args.warmup} warmup (whole run {total_s:.1f} s)"),
        ("step time median", f"{median_s * 1e3:.1f} ms"),
        ("step time mean", f"{mean_s * 1e3:.1f} ms"),
        ("tokens/s", f"{tokens_per_s:,.0f}"),
        ("TFLOP/s per GPU", f"{achieved_tflops:.4g} (flops/token {fpt:.4g} = 6*N_matmul + 12*L*s*h, "
                            "attention not halved for causality)"),
        ("MFU", f"{mfu * 100:.3g}% of {peak:g} TFLOP/s bf16 peak"
                + (" (nominal CPU figure)" if device == "cpu" and args.peak_tflops is None else "")),
        ("peak memory", f"{mem_gib:.2f} GiB ({mem_kind})"),
        ("final loss", f"{final_loss:.4f}"),
    ]
    for key, value in lines:
        print(f"{key}: {value}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=1)
    return 0


def count_params_of(model_cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return count_params(Llama(model_cfg))


if __name__ == "__main__":
    sys.exit(main())
