"""Long sequences with context parallelism on CPU (gloo): a 32k-token run trains, and zigzag
sharding balances causal attention where contiguous sharding does not.

Part 1 (``--seq-len``, default 32,768) trains a small Llama for ``--steps`` steps, one sequence
a step, on ``--cp`` ranks with ring attention over zigzag chunks and document masks, and
prints the loss per step, the step time, and the attention activations each rank keeps for
backward against what one process would keep (measured with saved-tensor hooks on one
forward of one layer's attention).

Part 2 times one layer's ring attention forward + backward (``--attn-seq`` tokens, same
model) under zigzag and contiguous sharding, alternating ``--rounds`` rounds, and prints each
rank's attention compute time: the max/mean ratio is the load imbalance the sharding causes
(theory: 1.0 for zigzag; for contiguous (2cp - 1)/cp in causal FLOPs, 2cp/(cp + 1) in the
kernel's chunk blocks, since a diagonal block is computed whole and masked). Communication waits are excluded by
timing only the local block computations (the ring's hop loop is synchronous, so the slowest
rank sets the pace).

    .venv/bin/python bench/long_context.py [--cp 4] [--seq-len 32768] [--steps 3] [--attn-seq 8192] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from plait.config import build_config
from plait.launch import spawn
from plait.models.attention import causal_attention
from plait.models.llama import build_model
from plait.parallel import ring_attention as ring
from plait.parallel.context_parallel import apply_context_parallel, sequence_layout
from plait.parallel.dims import ParallelDims
from plait.train.trainer import run_training

MODEL = {"model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.ffn_dim": 256}


def training_config(folder: str, args: argparse.Namespace, cp: int):
    return build_config(values={
        **MODEL, "model.max_seq_len": args.seq_len, "run.dir": os.path.join(folder, "run"),
        "data.source": os.path.join(folder, "corpus.jsonl"), "data.tokenizer": "bpe:300",
        "data.cache_dir": os.path.join(folder, "cache"), "data.val_fraction": 0.0,
        "train.seq_len": args.seq_len, "train.global_batch": 1, "train.micro_batch": 1,
        "train.steps": args.steps, "train.lr": 3e-3, "train.warmup_steps": 0, "train.sample_tokens": 0,
        "train.device": "cpu", "metrics.tensorboard": False, "metrics.plot": False, "metrics.progress": False,
        "parallel.nproc": cp, "parallel.cp": cp, "parallel.dp_shard": -1,
    })


def train_long(folder: str, args: argparse.Namespace) -> dict:
    result = run_training(training_config(folder, args, dist.get_world_size()))
    return {"losses": result.losses}


def saved_bytes(fn, *tensors) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*tensors)
    return sum(seen.values())


def qkv(tokens: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    heads, dim = MODEL["model.n_heads"], MODEL["model.dim"] // MODEL["model.n_heads"]
    return [torch.randn(1, heads, tokens, dim, generator=gen).requires_grad_() for _ in range(3)]


class _TimedPairs:
    """Wraps the kernel's pair iterator to time the block computations between pairs."""

    def __init__(self):
        self.seconds = 0.0
        self.original = ring._pairs

    def __call__(self, plan, block):
        for item in self.original(plan, block):
            start = time.perf_counter()
            yield item
            self.seconds += time.perf_counter() - start


def attention_timing(args: argparse.Namespace) -> dict:
    """One layer's ring attention, forward + backward, under each sharding: this rank's
    compute seconds (median over rounds) and saved bytes."""
    cp = dist.get_world_size()
    out: dict[str, dict] = {}
    timer = _TimedPairs()
    ring._pairs = timer
    q_full, k_full, v_full = qkv(args.attn_seq)
    for shard in ("zigzag", "contiguous") * args.rounds:
        cfg = build_config(values={**MODEL, "model.vocab_size": 256, "model.max_seq_len": args.attn_seq,
                                   "train.seq_len": args.attn_seq, "train.global_batch": 1, "train.micro_batch": 1,
                                   "parallel.nproc": cp, "parallel.cp": cp, "parallel.cp_shard": shard,
                                   "parallel.dp_shard": 1})
        dims = ParallelDims.from_config(cfg, cp)
        dims.build_mesh("cpu")
        model = build_model(cfg.model)
        apply_context_parallel(model, dims, cfg)
        core = model.layers["0"].attention.core
        layout = sequence_layout(cfg)
        q, k, v = (layout.shard(x.detach().transpose(1, 2), dims.cp_rank()).transpose(1, 2).requires_grad_()
                   for x in (q_full, k_full, v_full))
        dist.barrier()
        timer.seconds = 0.0
        core(q, k, v, None).sum().backward()
        entry = out.setdefault(shard, {"seconds": [], "saved": saved_bytes(lambda *t: core(*t, None), q, k, v)})
        entry["seconds"].append(timer.seconds)
    return {shard: {"seconds": statistics.median(e["seconds"]), "saved": e["saved"]} for shard, e in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cp", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--attn-seq", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print("command:", "python " + " ".join(shlex.quote(a) for a in sys.argv))

    with tempfile.TemporaryDirectory() as folder:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from tests.parallel.harness import write_corpus  # the parity harness's long-tailed corpus

        # ~1,500 documents of 20-400 words: several 32k-token windows after BPE.
        write_corpus(folder, n_docs=max(600, args.seq_len * (args.steps + 1) // 80), seed=0)
        start = time.perf_counter()
        losses = spawn(train_long, args.cp, (folder, args))[0]["losses"]
        elapsed = time.perf_counter() - start
    print(f"\n1) {args.seq_len:,}-token sequences, cp={args.cp} (ring, zigzag, document masks), {MODEL}")
    for step, loss in sorted(losses.items()):
        print(f"   step {step}: loss {loss:.4f}")
    print(f"   wall time {elapsed:.0f} s for {args.steps} steps (includes tokenizer training and process start)")

    single = saved_bytes(lambda *t: causal_attention(*t, None), *qkv(args.attn_seq))
    timings = spawn(attention_timing, args.cp, (args,))
    print(f"\n2) one layer's attention, {args.attn_seq:,} tokens, forward + backward, cp={args.cp}")
    print(f"   {'sharding':<11} {'rank compute s':<32} {'max/mean':>8} {'saved/rank vs 1 process':>24}")
    for shard in ("zigzag", "contiguous"):
        secs = [t[shard]["seconds"] for t in timings]
        share = statistics.mean(t[shard]["saved"] for t in timings) / single
        print(f"   {shard:<11} {' '.join(f'{s:6.2f}' for s in secs):<32} {max(secs) / statistics.mean(secs):8.2f} "
              f"{share:24.3f}")
    cp = args.cp
    print(f"   theory: zigzag 1.00; contiguous {(2 * cp - 1) / cp:.2f} in causal FLOPs, {2 * cp / (cp + 1):.2f} in "
          f"chunk blocks (the kernel computes a diagonal block whole, masked); saved share 1/cp = {1 / cp:.3f}")


if __name__ == "__main__":
    main()
