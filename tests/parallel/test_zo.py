"""lowbw.method = zo on 4 gloo workers (one spawned group runs every case): the workers stay
bitwise identical for 100 steps, each sends one byte per direction per step, a corrupted worker
is caught by the hash check, the loss goes down, and a resume is bit-identical."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from plait.config import LowBWConfig
from plait.launch import spawn
from plait.lowbw.zo_step import WorkerDivergence, ZerothOrder
from plait.train.trainer import run_training
from tests.parallel.harness import job, roll_back, write_corpus

STEPS = 100
ZO = {"lowbw.method": "zo", "lowbw.zo_eps": 1e-3, "lowbw.zo_bits": 8, "train.lr": 2e-3, "train.warmup_steps": 0,
      "train.steps": STEPS, "train.eval_every": 50, "parallel.nproc": 4, "parallel.dp_replicate": 4,
      "parallel.dp_shard": 1, "model.n_layers": 2}


def cases(workdir: str) -> dict:
    out = {}
    cfg = job(workdir, "zo4", **ZO)
    result = run_training(cfg)
    out["losses"], out["val"] = result.losses, result.val_losses
    # Resume: the directions come from the step, the scale from the checkpoint: bit-identical.
    common = {**ZO, "train.steps": 20, "checkpoint.every": 10, "checkpoint.keep": 5}
    out["full"] = run_training(job(workdir, "zo_resume", **common)).losses
    if dist.get_rank() == 0:
        roll_back(os.path.join(workdir, "runs", "zo_resume"), 10)
    dist.barrier()
    out["resumed"] = run_training(job(workdir, "zo_resume", **common, **{"checkpoint.resume": True})).losses
    # Workers sharded inside (FSDP over 2 ranks, 2 workers): z drawn shard by shard, still in step.
    sharded = {**ZO, "parallel.dp_replicate": 2, "parallel.dp_shard": 2, "train.steps": 10, "train.eval_every": 0}
    result = run_training(job(workdir, "zo_fsdp", **sharded))
    out["sharded"] = result.losses
    out["sharded_sent"] = [result.comm_bytes[s].get("dp_replicate", 0) for s in sorted(result.comm_bytes)]
    # Only the norms and the output layer.
    subset = {**ZO, "train.steps": 10, "train.eval_every": 0, "lowbw.zo_params": "norms_and_output"}
    out["subset"] = run_training(job(workdir, "zo_subset", **subset)).losses
        # A corrupted weight on one worker is caught by the next step's check.
    model = torch.nn.Linear(4, 4)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.weight)
    loop = ZerothOrder(LowBWConfig(method="zo"), [model], dist.group.WORLD, None, dist.get_rank(), 0, dist.group.WORLD)
    if dist.get_rank() == 1:
        with torch.no_grad():
            model.weight[0, 0] += 1e-6
    try:
        loop.step(1, lambda: float(model.weight.sum()), 1e-3)
        out["caught"] = ""
    except WorkerDivergence as err:
        out["caught"] = str(err)
    return out


def test_zo_workers(tmp_path):
    workdir = str(tmp_path)
    write_corpus(workdir)
    ranks = spawn(cases, 4, (workdir,))
    # Bitwise agreement: the check ran after every one of 100 steps (it raises otherwise) and
    # every rank reports the same losses.
    assert all(r["losses"] == ranks[0]["losses"] for r in ranks)
    with open(os.path.join(workdir, "runs", "zo4", "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if '"loss"' in line]
    # One byte per direction per step, after the first step's float32 (which seeds the scale).
    assert [r["sync_bytes"] for r in rows] == [4] + [1] * (STEPS - 1)
    assert all(r["comm_bytes"].get("dp_replicate", 0) == 3 * r["sync_bytes"] for r in rows)  # ring all-gather of 4
    # It learns.
    val = ranks[0]["val"]
    assert val[STEPS] < val[0], val
    assert all(r["sharded"] == ranks[0]["sharded"] and r["subset"] == ranks[0]["subset"] for r in ranks)
    assert len(ranks[0]["sharded"]) == len(ranks[0]["subset"]) == 10
    # A worker of 2 ranks sends one level per step, from its first rank (ranks 0 and 2 lead the
    # workers {0, 1} and {2, 3}): the all-gather between the 2 leaders is 1 wire byte each.
    for rank in (0, 2):
        assert ranks[rank]["sharded_sent"] == [4] + [1] * 9, ranks[rank]["sharded_sent"]
    for rank in (1, 3):
        assert ranks[rank]["sharded_sent"] == [0] * 10, ranks[rank]["sharded_sent"]
    for rank in ranks:
        assert "the workers' weights differ" in rank["caught"], rank["caught"]
        assert sorted(rank["resumed"]) == list(range(11, 21))
        assert all(rank["resumed"][s] == rank["full"][s] for s in range(11, 21)), (rank["full"], rank["resumed"])
