"""plait's single-process training step against a bare PyTorch loop, side by side.

Same model (plait's Llama, same init), same batches, same AdamW and clipping, same dtype.
The two run in alternating rounds so machine noise hits both alike; the figure is the
median tokens/s of each and their ratio (plait / bare; 1.00 = no overhead).

    .venv/bin/python bench/overhead.py [--rounds 6] [--steps 5] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from plait.config import build_config
from plait.models.llama import build_model
from plait.train.optim import build_optimizer
from plait.train.trainer import Trainer


def bare_step(model, optimizer, micro_batches, autocast) -> float:
    """The loop a user would write by hand: forward, loss, backward, clip, step."""
    tokens = sum(int((mb["labels"] != -100).sum()) for mb in micro_batches)
    total = 0.0
    for mb in micro_batches:
        with autocast:
            logits = model(mb["input_ids"], mb["position_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), mb["labels"].flatten(), ignore_index=-100, reduction="sum")
        (loss / tokens).backward()
        total += float(loss.detach())
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5, help="steps per round per contender")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = build_config(values={
            "run.dir": run_dir, "parallel.nproc": 1, "train.device": "cpu", "train.dtype": args.dtype,
            "train.steps": 10_000, "train.global_batch": 8, "train.micro_batch": 4,
            "train.sample_tokens": 0, "metrics.tensorboard": False, "metrics.plot": False,
        })
        trainer = Trainer(cfg)
        model = build_model(trainer.cfg.model, "cpu", seed=cfg.train.seed)
        optimizer = build_optimizer([model], trainer.cfg.train)
        autocast = trainer.autocast
        batches = [trainer.loader.next_step() for _ in range(args.steps)]
        tokens = cfg.train.global_batch * cfg.train.seq_len * args.steps

        def timed(fn) -> float:
            begin = time.perf_counter()
            fn()
            return tokens / (time.perf_counter() - begin)

        # one warm-up round each (allocator, kernels)
        trainer.train_step(batches[0])
        bare_step(model, optimizer, batches[0], autocast)
        plait_rates, bare_rates = [], []
        for _ in range(args.rounds):
            plait_rates.append(timed(lambda: [trainer.train_step(b) for b in batches]))
            bare_rates.append(timed(lambda: [bare_step(model, optimizer, b, autocast) for b in batches]))
        plait_tps, bare_tps = statistics.median(plait_rates), statistics.median(bare_rates)
        print(f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, dtype {args.dtype}, "
              f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps x "
              f"{cfg.train.global_batch * cfg.train.seq_len} tokens")
        print(f"bare PyTorch loop : {bare_tps:8.0f} tokens/s (median)")
        print(f"plait train_step  : {plait_tps:8.0f} tokens/s (median)")
        print(f"ratio plait/bare  : {plait_tps / bare_tps:.3f}")


if __name__ == "__main__":
    main()
