"""Training time lost per checkpoint, synchronous against ``checkpoint.async``, in alternating rounds.

One spawned group of 4 CPU ranks (gloo, FSDP over 4) builds one trainer and trains it in
segments of ``--steps`` steps. Each round runs three segments, in an order that rotates from
round to round so a drift in the machine's speed falls on every case alike: ``none`` (no
checkpoint), ``sync`` (a synchronous checkpoint every ``--every`` steps) and ``async``
(``checkpoint.async``: the step's state is copied, then written in the background); an async
segment ends when its last save is published, and that wait counts. Checkpoints fall on the
segment's steps every, 2·every, ... before its last step, into the run's one checkpoint folder
(``checkpoint.keep = 1``: each save prunes the one before, as a real run's would).

Lost time per checkpoint, per round = (segment seconds − steps × the median step of that
round's ``none`` segment) / checkpoints; the figure is the median over rounds of each case, and
async's median as a fraction of sync's (the issue's bound: at most 0.25). Medians, because a
step takes seconds and another process on the machine can add seconds to any of them.

The loop is the trainer's own step and checkpoint (``Trainer._step``, ``Trainer._checkpoint``);
the sync segments run the same trainer with its background saver set aside, so all cases train
the same model in the same memory. Workers run with OMP_NUM_THREADS=1 (4 ranks share the cores).

    OMP_NUM_THREADS=1 .venv/bin/python bench/checkpoint_async.py [--rounds 3] [--steps 6] [--every 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from plait.config import build_config
from plait.launch import preflight, spawn
from plait.train.trainer import TrainResult, Trainer

# ~114M parameters: 16 blocks of dim 768 (the tokenizer's small vocabulary adds little).
MODEL = {"model.dim": 768, "model.n_layers": 16, "model.n_heads": 12, "model.n_kv_heads": 12, "model.ffn_dim": 2048,
         "model.max_seq_len": 64}
CASES = ("none", "sync", "async")


def job(root: str, total_steps: int):
    return build_config(values={
        **MODEL, "run.dir": os.path.join(root, "run"), "parallel.nproc": 4, "parallel.dp_shard": 4,
        "train.device": "cpu", "train.steps": total_steps, "train.seq_len": 32, "train.global_batch": 4,
        "train.micro_batch": 1, "train.eval_every": 0, "train.sample_tokens": 0,
        "data.cache_dir": os.path.join(root, "cache"), "checkpoint.keep": 1, "checkpoint.async": True,
        "metrics.tensorboard": False, "metrics.plot": False, "metrics.progress": False, "metrics.log_every": 1000,
    })


def segment(trainer: Trainer, case: str, first: int, steps: int, every: int) -> dict:
    """Inside a rank: train steps ``first``..``first + steps - 1`` as ``case``; returns the
    segment's seconds (between barriers), each step's seconds and its checkpoints."""
    saver = trainer.saver
    trainer.saver = saver if case == "async" else None  # None: _checkpoint saves synchronously
    saves = [] if case == "none" else [first + k for k in range(every - 1, steps - 1, every)]
    result, step_s = TrainResult(), []
    dist.barrier()
    begin = time.perf_counter()
    for step in range(first, first + steps):
        start = time.perf_counter()
        trainer._step(step, result)
        if step in saves:
            trainer._checkpoint(step, result)
        step_s.append(time.perf_counter() - start)
    if trainer.saver is not None:
        trainer._saved(trainer.saver.wait(), result)  # the segment is over when its last save is
    dist.barrier()
    trainer.saver = saver
    return {"seconds": time.perf_counter() - begin, "step_s": step_s, "checkpoints": len(saves)}


def rank_main(root: str, rounds: int, steps: int, every: int) -> dict:
    torch.set_num_threads(1)
    trainer = Trainer(job(root, rounds * len(CASES) * steps))
    out: dict = {"params": trainer.n_params, "rounds": []}
    first = 1
    for r in range(rounds):
        order = CASES[r % 3:] + CASES[:r % 3]
        timed = {}
        for case in order:
            timed[case] = segment(trainer, case, first, steps, every)
            first += steps
        out["rounds"].append({"order": list(order), **timed})
    return out


def lost_per_checkpoint(round_: dict, case: str) -> float:
    """(segment seconds − steps × the round's median no-checkpoint step) / checkpoints."""
    base = statistics.median(round_["none"]["step_s"])
    seg = round_[case]
    return (seg["seconds"] - len(seg["step_s"]) * base) / seg["checkpoints"]


def report(out: dict, args: argparse.Namespace) -> dict:
    rounds = out["rounds"]
    lost = {case: [lost_per_checkpoint(r, case) for r in rounds] for case in ("sync", "async")}
    median = {case: statistics.median(values) for case, values in lost.items()}
    ratio = median["async"] / median["sync"]
    checkpoints = rounds[0]["sync"]["checkpoints"]
    print(f"model {out['params'] / 1e6:.1f}M parameters, 4 ranks (gloo, FSDP), {args.rounds} rounds of "
          f"{args.steps} steps per case, checkpoint every {args.every} ({checkpoints} per segment)")
    for i, r in enumerate(rounds):
        cells = ", ".join(f"{case} {r[case]['seconds']:.2f} s" for case in r["order"])
        print(f"  round {i + 1}: {cells}; median step (none) {statistics.median(r['none']['step_s']):.2f} s; "
              f"lost per checkpoint: sync {lost['sync'][i]:.2f} s, async {lost['async'][i]:.2f} s")
    print(f"median lost per checkpoint: sync {median['sync']:.2f} s, async {median['async']:.2f} s")
    print(f"async / sync lost time per checkpoint: {ratio:.2f} (bound 0.25: {'met' if ratio <= 0.25 else 'NOT met'})")
    return {"runs": out, "lost_per_checkpoint_s": lost, "median_lost_s": median, "ratio": ratio,
            "rounds": args.rounds, "steps": args.steps, "every": args.every}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="steps per case per round")
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp folder)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # the spawned workers inherit it
    root = tempfile.mkdtemp(prefix="plait-ckpt-bench-", dir=args.dir)
    try:
        preflight(job(root, 1), 4)  # tokenizer and token cache, once
        out = spawn(rank_main, 4, (root, args.rounds, args.steps, args.every))[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = report(out, args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1)


if __name__ == "__main__":
    main()
