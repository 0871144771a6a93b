"""Training time lost per checkpoint, synchronous against ``checkpoint.async``, side by side.

One spawned group of 4 CPU ranks (gloo, FSDP over 4) trains the same model from the same
init three times: without checkpoints, with a synchronous checkpoint every ``--every`` steps,
and with an asynchronous one (``checkpoint.async = true``: the step's state is copied, then
written in the background). The async run's time includes waiting for its last save at the
end. Lost time per checkpoint = (run time - the run without checkpoints) / checkpoints;
the figure is async's loss as a fraction of sync's (the issue's bound: at most 0.25).

The loop is the trainer's own step and checkpoint (``Trainer._step``, ``Trainer._checkpoint``)
rather than ``Trainer.run``, which always saves after the last step: the baseline must save
nothing. Checkpoints fall on steps every, 2·every, ... before the last step. Short sequences
and few steps: it is the checkpoint's cost that is measured, not the step's. Workers run with
OMP_NUM_THREADS=1 (4 ranks share the cores).

    OMP_NUM_THREADS=1 .venv/bin/python bench/checkpoint_async.py [--steps 12] [--every 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
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


def job(root: str, case: str, steps: int):
    return build_config(values={
        **MODEL, "run.dir": os.path.join(root, case), "parallel.nproc": 4, "parallel.dp_shard": 4,
        "train.device": "cpu", "train.steps": steps, "train.seq_len": 32, "train.global_batch": 4,
        "train.micro_batch": 1, "train.eval_every": 0, "train.sample_tokens": 0,
        "data.cache_dir": os.path.join(root, "cache"), "checkpoint.keep": 1, "checkpoint.async": case == "async",
        "metrics.tensorboard": False, "metrics.plot": False, "metrics.progress": False, "metrics.log_every": 1000,
    })


def timed_run(root: str, case: str, steps: int, every: int) -> dict:
    """Inside a rank: train ``steps`` steps of ``case``; returns its seconds (between barriers)."""
    trainer = Trainer(job(root, case, steps))
    result = TrainResult()
    saves = [s for s in range(every, steps, every)] if case != "none" else []
    dist.barrier()
    begin = time.perf_counter()
    for step in range(1, steps + 1):
        trainer._step(step, result)
        if step in saves:
            trainer._checkpoint(step, result)
    waited = time.perf_counter()
    if trainer.saver is not None:
        trainer._saved(trainer.saver.wait(), result)  # the run is over when its last save is
    dist.barrier()
    end = time.perf_counter()
    out = {"seconds": end - begin, "end_wait_s": end - waited, "checkpoints": len(saves),
           "params": trainer.n_params, "loss": result.losses[steps]}
    del trainer
    gc.collect()
    if dist.get_rank() == 0:
        shutil.rmtree(os.path.join(root, case), ignore_errors=True)  # 1.4 GB per checkpoint
    dist.barrier()
    return out


def rank_main(root: str, steps: int, every: int) -> dict:
    torch.set_num_threads(1)
    return {case: timed_run(root, case, steps, every) for case in CASES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp folder)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # the spawned workers inherit it
    root = tempfile.mkdtemp(prefix="plait-ckpt-bench-", dir=args.dir)
    try:
        preflight(job(root, "none", args.steps), 4)  # tokenizer and token cache, once
        out = spawn(rank_main, 4, (root, args.steps, args.every))[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = out["none"]["seconds"]
    lost = {c: (out[c]["seconds"] - base) / out[c]["checkpoints"] for c in ("sync", "async")}
    print(f"model {out['none']['params'] / 1e6:.1f}M parameters, 4 ranks (gloo, FSDP), {args.steps} steps, "
          f"checkpoint every {args.every} ({out['sync']['checkpoints']} checkpoints)")
    for case in CASES:
        extra = f", lost per checkpoint {lost[case]:.2f} s" if case in lost else ""
        print(f"  {case:5s}: {out[case]['seconds']:.2f} s (end wait {out[case]['end_wait_s']:.2f} s){extra}")
    ratio = lost["async"] / lost["sync"]
    print(f"async / sync lost time per checkpoint: {ratio:.2f} (bound 0.25)")
    same = out["sync"]["loss"] == out["async"]["loss"] == out["none"]["loss"]
    print(f"final loss identical in all three runs: {same}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"runs": out, "lost_per_checkpoint_s": lost, "ratio": ratio, "steps": args.steps,
                       "every": args.every}, fh, indent=1)


if __name__ == "__main__":
    main()
