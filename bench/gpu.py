"""Single-GPU training throughput of a Llama-3.2-1B-shaped model: tokens/s and MFU.

plait's Llama (16 layers, dim 2048, 32 heads, 8 KV heads, FFN 8192, vocab 128256, tied
embeddings, llama3 RoPE scaling) trains on one GPU at seq 4096: fp32 master weights with bf16
autocast (how plait trains in bf16), AdamW (torch's, fused on CUDA; same parameter groups as
plait's ``build_optimizer``), gradient clipping at 1.0 (plait's ``clip_grad_norm``), and each
block compiled with ``torch.compile`` (per-block compile, as plait will use). The data are
uniform random token ids, one document per sequence (plain causal attention). The first
``--warmup`` steps (compilation, allocator) are not timed; CUDA is synchronized around every
timed step.

MFU = flops_per_token(model, seq) x tokens/s / peak, with plait's FLOP count
6·N_matmul + 12·L·s·h (matmul weights including the output layer; attention is not halved for
causality) against the GPU's dense bf16 peak. tokens/s = tokens per step / mean step time.

    .venv/bin/python bench/gpu.py [--steps 30] [--warmup 5] [--micro-batch 1] [--seq-len 4096]
                                  [--no-compile] [--activation-checkpointing none|full]
                                  [--peak-tflops T] [--json PATH]
    .venv/bin/python bench/gpu.py --smoke     # tiny model on CPU, a few seconds (the tests)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext

import torch

from plait.config import ModelConfig, TrainConfig
from plait.models.llama import build_model, count_params
from plait.parallel.recompute import apply_activation_checkpointing
from plait.train.loss import token_loss_sum
from plait.train.metrics import flops_per_token, peak_memory_gib
from plait.train.optim import clip_grad_norm

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
        vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=max(seq_len, 64),
        rope_theta=500000.0, rope_scaling="llama3", rope_factor=32.0, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0, rope_original_max_seq_len=8192, norm_eps=1e-5, tie_embeddings=True,
    )


def lookup_peak(name: str) -> float | None:
    for key, peak in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def make_optimizer(model: torch.nn.Module, train_cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """plait's build_optimizer groups (decay on matrices only), with ``fused`` on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": train_cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.eps, fused=fused
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30; smoke 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; smoke 1)")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 4096; smoke 64)")
    parser.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile each block (default on; off in --smoke)")
    parser.add_argument("--activation-checkpointing", choices=["none", "full"], default="none")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                        help="bf16 = fp32 weights with bf16 autocast (default)")
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
    for name in ("steps", "micro_batch", "seq_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU (none found); use --smoke for the CPU smoke run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        peak = args.peak_tflops or lookup_peak(device_name)
        if peak is None:
            print(f"unknown peak for '{device_name}': pass --peak-tflops (dense bf16 TFLOP/s)", file=sys.stderr)
            return 2
    else:
        device_name = f"CPU ({torch.get_num_threads()} threads)"
        peak = args.peak_tflops or SMOKE_PEAK_TFLOPS

    model_cfg = (tiny if args.smoke else llama_1b)(args.seq_len)
    train_cfg = TrainConfig(lr=3e-4, seq_len=args.seq_len, micro_batch=args.micro_batch, grad_clip=1.0)
    torch.manual_seed(args.seed)
    model = build_model(model_cfg, device, seed=args.seed)
    n_params = count_params(model)
    model.train()
    if args.activation_checkpointing != "none":
        apply_activation_checkpointing(model, args.activation_checkpointing)
    if args.compile:
        for block in model.layers.values():
            block.compile()  # in place: parameter names unchanged, as plait will do it
    fused = device.type == "cuda"
    optimizer = make_optimizer(model, train_cfg, fused=fused)
    params = list(model.parameters())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()

    batch, seq = args.micro_batch, args.seq_len
    tokens_per_step = batch * seq
    gen = torch.Generator(device="cpu").manual_seed(args.seed)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, model_cfg.vocab_size, (batch, seq + 1), generator=gen)
        ids = ids.to(device, non_blocking=True)
        return ids[:, :-1], ids[:, 1:]

    def step() -> tuple[float, float]:
        inputs, labels = next_batch()
        with autocast:
            logits = model(inputs, doc_mask=False)
        loss_sum = token_loss_sum(logits, labels)
        del logits
        (loss_sum / tokens_per_step).backward()
        norm = clip_grad_norm(params, train_cfg.grad_clip)  # returns a Python float: syncs
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss_sum.detach()) / tokens_per_step, norm

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm_begin = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - warm_begin
    times, losses = [], []
    for _ in range(args.steps):
        sync()
        begin = time.perf_counter()
        loss, _ = step()
        sync()
        times.append(time.perf_counter() - begin)
        losses.append(loss)

    mean_s, median_s = statistics.fmean(times), statistics.median(times)
    tokens_per_s = tokens_per_step / mean_s
    fpt = flops_per_token(model_cfg, seq)
    achieved_tflops = fpt * tokens_per_s / 1e12
    mfu = achieved_tflops / peak
    mem_gib = peak_memory_gib(device)
    mem_kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS"
    figures = {
        "device": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "mode": "smoke" if args.smoke else "full",
        "model": "tiny (smoke)" if args.smoke else "Llama-3.2-1B shape",
        "params": n_params,
        "dtype": "fp32 weights + bf16 autocast" if args.dtype == "bf16" else "fp32",
        "compile": "per block" if args.compile else "off",
        "activation_checkpointing": args.activation_checkpointing,
        "optimizer": "AdamW fused" if fused else "AdamW (foreach)",
        "micro_batch": batch,
        "seq_len": seq,
        "tokens_per_step": tokens_per_step,
        "warmup_steps": args.warmup,
        "warmup_s": warmup_s,
        "timed_steps": args.steps,
        "step_s_median": median_s,
        "step_s_mean": mean_s,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": fpt,
        "tflops_per_gpu": achieved_tflops,
        "peak_tflops": peak,
        "mfu": mfu,
        "peak_mem_gib": mem_gib,
        "final_loss": losses[-1],
    }
    lines = [
        ("device", device_name),
        ("torch", torch.__version__ + (f" (CUDA {torch.version.cuda})" if device.type == "cuda" else "")),
        ("model", f"{figures['model']}: {model_cfg.n_layers} layers, dim {model_cfg.dim}, {model_cfg.n_heads} heads, "
                  f"{model_cfg.n_kv_heads} KV heads, FFN {model_cfg.ffn_dim}, vocab {model_cfg.vocab_size}, tied embeddings"),
        ("params", f"{n_params:,} ({n_params / 1e9:.3f} B)"),
        ("setup", f"{figures['dtype']}, compile {figures['compile']}, activation checkpointing "
                  f"{args.activation_checkpointing}, {figures['optimizer']}, grad clip 1.0, uniform random tokens"),
        ("tokens/step", f"{tokens_per_step:,} ({batch} x {seq})"),
        ("steps", f"{args.steps} timed after {args.warmup} warmup ({warmup_s:.1f} s)"),
        ("step time median", f"{median_s * 1e3:.1f} ms"),
        ("step time mean", f"{mean_s * 1e3:.1f} ms"),
        ("tokens/s", f"{tokens_per_s:,.0f}"),
        ("TFLOP/s per GPU", f"{achieved_tflops:.4g} (flops/token {fpt:.4g} = 6*N_matmul + 12*L*s*h, "
                            "attention not halved for causality)"),
        ("MFU", f"{mfu * 100:.3g}% of {peak:g} TFLOP/s bf16 peak"
                + (" (nominal CPU figure)" if device.type == "cpu" and args.peak_tflops is None else "")),
        ("peak memory", f"{mem_gib:.2f} GiB ({mem_kind})"),
        ("final loss", f"{losses[-1]:.4f}"),
    ]
    for key, value in lines:
        print(f"{key}: {value}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
