"""Mixture of experts against the dense model with the same active parameters (CPU, gloo).

Dense: a SwiGLU MLP of ``--ffn`` hidden units per block. MoE: ``--experts`` experts of
``--ffn / top_k`` hidden units each, top-``--top-k`` routing, so every token multiplies by the
same number of MLP weights (the router adds dim x experts). Both train on the same synthetic
long-tailed corpus with the same batches. Contenders, each for ``--steps`` steps:

- dense, 1 process;   MoE, 1 process (all experts local);
- dense, FSDP over 2 ranks;   MoE, FSDP over 2 ranks with ep = 2 (each rank holds half the
  experts; rows go to their expert's rank by all-to-all and back).

The figure is the median tokens/s over the steps after ``--warmup``, read from each run's
metrics.jsonl, and the MoE / dense ratio for the same layout. One torch thread per rank.

    .venv/bin/python bench/moe.py [--dim 256] [--layers 4] [--ffn 1024] [--experts 8] [--top-k 2] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile

import torch

from plait.config import build_config
from plait.launch import spawn
from plait.train.trainer import run_training


def config(folder: str, name: str, args: argparse.Namespace, moe: bool, nproc: int):
    values = {
        "run.dir": os.path.join(folder, name), "model.dim": args.dim, "model.n_layers": args.layers,
        "model.n_heads": 8, "model.ffn_dim": args.ffn, "model.max_seq_len": args.seq_len,
        "data.source": os.path.join(folder, "corpus.jsonl"), "data.tokenizer": "bpe:1024",
        "data.cache_dir": os.path.join(folder, "cache"), "data.val_fraction": 0.0,
        "train.seq_len": args.seq_len, "train.global_batch": 8, "train.micro_batch": 4, "train.steps": args.steps,
        "train.sample_tokens": 0, "train.device": "cpu", "metrics.tensorboard": False, "metrics.plot": False,
        "metrics.progress": False, "parallel.nproc": nproc, "parallel.dp_shard": -1,
    }
    if moe:
        values.update({"model.moe_experts": args.experts, "model.moe_top_k": args.top_k,
                       "model.moe_ffn_dim": args.ffn // args.top_k, "parallel.ep": 2 if nproc == 2 else 1})
    return build_config(values=values)


def train(folder: str, name: str, args: argparse.Namespace, moe: bool) -> None:
    nproc = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    run_training(config(folder, name, args, moe, nproc))


def tokens_per_s(folder: str, name: str, warmup: int) -> float:
    with open(os.path.join(folder, name, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if '"tokens_per_s"' in line]
    return statistics.median(r["tokens_per_s"] for r in rows if r["step"] > warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    print("command:", "python " + " ".join(shlex.quote(a) for a in sys.argv))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.parallel.harness import write_corpus  # the parity harness's long-tailed corpus

    rates: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as folder:
        write_corpus(folder, n_docs=400)
        for layout, nproc in (("1 process", 1), ("2 ranks", 2)):
            for kind in ("dense", "moe"):
                name = f"{kind}_{nproc}"
                if nproc == 1:
                    train(folder, name, args, kind == "moe")
                else:
                    spawn(train, nproc, (folder, name, args, kind == "moe"))
                rates[layout, kind] = tokens_per_s(folder, name, args.warmup)
    active = 3 * args.dim * args.ffn
    print(f"\nblocks: dim {args.dim}, {args.layers} layers; dense MLP {args.ffn}; MoE {args.experts} experts x "
          f"{args.ffn // args.top_k}, top-{args.top_k} ({active:,} active MLP weights per block either way)")
    print(f"{'layout':<22} {'dense tok/s':>12} {'MoE tok/s':>12} {'MoE / dense':>12}")
    for layout in ("1 process", "2 ranks"):
        dense, moe = rates[layout, "dense"], rates[layout, "moe"]
        label = layout if layout == "1 process" else "2 ranks (MoE: ep=2)"
        print(f"{label:<22} {dense:12.0f} {moe:12.0f} {moe / dense:12.2f}")


if __name__ == "__main__":
    main()
