"""DiLoCo, Streaming DiLoCo and CO2 on gloo ranks. One spawned group of 4 ranks runs every
case (spawning costs seconds); the worker returns what the tests then check."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from plait.config import LowBWConfig, build_config
from plait.launch import spawn
from plait.lowbw.diloco import OuterLoop, WorkerDivergence
from plait.lowbw.fragments import split_fragments
from plait.models.llama import build_model
from plait.telemetry import collectives as comm
from plait.train.trainer import run_training
from tests.parallel.harness import RTOL, job, roll_back, write_corpus

STEPS = 8


def tiny_model():
    cfg = build_config(values={"model.dim": 32, "model.n_layers": 2, "model.n_heads": 4, "model.ffn_dim": 64,
                               "model.vocab_size": 40, "model.max_seq_len": 16, "train.seq_len": 16, "train.micro_batch": 1,
                               "parallel.nproc": 1})
    return build_model(cfg.model, "cpu", seed=0)


def outer_round(group, kind: str, momentum: float) -> dict:
    """Two workers with different local weights; one DiLoCo round at step H = 1; returns the
    start, both workers' local weights and the new global weights."""
    cfg = LowBWConfig(method="diloco", inner_steps=1, quantize=kind, outer_momentum=momentum)
    model = tiny_model()
    loop = OuterLoop(cfg, [model], group, None, torch.device("cpu"))
    start = loop.global_w[0].clone()
    fragment = split_fragments([model], 1)[0]
    gen = torch.Generator().manual_seed(dist.get_rank())
    local = start + 0.01 * torch.randn(start.shape, generator=gen)
    fragment.write(local)
    locals_ = [torch.zeros_like(local) for _ in range(2)]
    dist.all_gather(locals_, local, group=group)
    loop.after_step(1)
    loop.close()
    return {"start": start, "locals": locals_, "global": loop.global_w[0].clone(), "model": fragment.read(),
            "bytes": loop.syncs[0]["bytes"]}


def diverged(group) -> str:
    """Rank 1's copy of the global weights is corrupted before the hash check: both see it."""
    loop = OuterLoop(LowBWConfig(method="diloco", inner_steps=1), [tiny_model()], group, None, torch.device("cpu"))
    if dist.get_rank() == 1:
        loop.global_w[0][0] += 1.0
    try:
        loop.after_step(1)
    except WorkerDivergence as err:
        return str(err)
    finally:
        loop.close()
    return ""


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def worker(workdir: str) -> dict:
    out: dict = {}
    rank = dist.get_rank()
    pair = dist.new_group([0, 1])  # the hand-checked round uses two workers
    comm.install()
    comm.register_group(pair, "dp_replicate")
    if rank < 2:
        out["round"] = {(k, m): outer_round(pair, k, m) for k in ("none", "int8") for m in (0.0, 0.9)}
        out["diverged"] = diverged(pair)
    dist.barrier()
    common = {"parallel.nproc": 4, "train.steps": STEPS, "train.eval_every": 0, "model.n_layers": 4,
              "train.global_batch": 8, "train.micro_batch": 2}
    diloco = {"lowbw.method": "diloco", "lowbw.inner_steps": 2, "parallel.dp_replicate": 2}
    runs = {
        # one worker layout against another: the same numbers
        "fsdp": {**diloco, "parallel.dp_shard": 2},
        "ddp": {**diloco, "parallel.dp_shard": 2, "parallel.zero": 0},
        "tp": {**diloco, "parallel.dp_shard": 1, "parallel.tp": 2, "parallel.zero": 3},
        # four single-rank workers, each method
        "diloco4": {**diloco, "parallel.dp_replicate": 4},
        "streaming4": {**diloco, "parallel.dp_replicate": 4, "lowbw.method": "streaming", "lowbw.inner_steps": 4,
                       "lowbw.fragments": 2, "lowbw.overlap_steps": 1},
        "streaming4_int4": {**diloco, "parallel.dp_replicate": 4, "lowbw.method": "streaming",
                            "lowbw.inner_steps": 4, "lowbw.fragments": 2, "lowbw.quantize": "int4",
                            "lowbw.error_feedback": True},
        "co2": {**diloco, "parallel.dp_replicate": 4, "lowbw.method": "co2"},
        "co2_penalty": {**diloco, "parallel.dp_replicate": 4, "lowbw.method": "co2", "lowbw.co2_penalty": 1.0},
        "co2_clip": {**diloco, "parallel.dp_replicate": 4, "lowbw.method": "co2", "lowbw.co2_clip": 1e-3},
        "ddp_baseline": {"parallel.dp_shard": 1, "parallel.dp_replicate": 4, "parallel.zero": 0,
                         "train.eval_every": STEPS},
    }
    for name, values in runs.items():
        cfg = job(workdir, name, **{**common, **values})
        result = run_training(cfg)
        out[name] = {"losses": result.losses, "norms": result.grad_norms, "val": result.val_losses}
        if rank == 0:
            out[name]["metrics"] = read_metrics(cfg.run.dir)
    # warm start (checkpoint.init_from): the 4-rank DDP run's final weights, resharded into two
    # DiLoCo workers of FSDP over 2 ranks each
    warm = {**common, **runs["fsdp"], "train.eval_every": STEPS,
            "checkpoint.init_from": os.path.join(workdir, "runs", "ddp_baseline")}
    out["warm_start"] = run_training(job(workdir, "warm_start", **warm)).val_losses
    # resume in the middle of a streaming run with an exchange in flight at the checkpoint:
    # two workers of FSDP over 2 ranks each, int8 outer gradients with error feedback
    name = "streaming_resume"
    values = {**common, **runs["streaming4"], "parallel.dp_replicate": 2, "parallel.dp_shard": 2,
              "lowbw.quantize": "int8", "lowbw.error_feedback": True, "checkpoint.every": 3, "checkpoint.keep": 5}
    full = run_training(job(workdir, name, **values)).losses
    if rank == 0:
        roll_back(os.path.join(workdir, "runs", name), 3)
    dist.barrier()
    resumed = run_training(job(workdir, name, **values, **{"checkpoint.resume": True})).losses
    out["resume"] = {"full": full, "resumed": resumed}
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("lowbw_ranks"))
    write_corpus(folder, n_docs=80)
    return spawn(worker, 4, (folder,))


def test_two_worker_outer_update_equals_hand_computed(results):
    for (kind, mu), rounds in results[0]["round"].items():
        other = results[1]["round"][(kind, mu)]
        assert torch.equal(rounds["global"], other["global"]), (kind, mu)  # bit-identical workers
        assert torch.equal(rounds["model"], rounds["global"]) and torch.equal(other["model"], rounds["global"])
        start, (a, b) = rounds["start"], rounds["locals"]
        grad = ((start - a) + (start - b)) / 2
        step = grad + mu * grad  # Nesterov, first step: b = g
        want = start - 0.7 * step
        if kind == "none":
            assert torch.allclose(rounds["global"], want, rtol=2.4e-7, atol=1e-8), mu  # a few ulp
        else:  # int8: the error of one 8-bit rounding of each of the two phases
            bound = 0.7 * (1 + mu) * 2 * (start - a).abs().max() / 127
            assert (rounds["global"] - want).abs().max() <= bound
            assert not torch.equal(rounds["global"], want)
    none, int8 = results[0]["round"][("none", 0.0)]["bytes"], results[0]["round"][("int8", 0.0)]["bytes"]
    assert 3.5 < none / int8 < 4.0  # 8 bits instead of 32, plus one fp32 scale per 128


def test_worker_divergence_is_caught(results):
    assert "differ after the outer sync" in results[0]["diverged"]
    assert "differ after the outer sync" in results[1]["diverged"]


def assert_close(got: dict, want: dict, name: str):
    assert got.keys() == want.keys()
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=RTOL), (name, step)


def test_worker_layout_does_not_change_diloco(results):
    """Two workers, each FSDP over 2 ranks, DDP over 2 ranks, or TP over 2 ranks."""
    r = results[0]
    assert_close(r["ddp"]["losses"], r["fsdp"]["losses"], "ddp")
    assert_close(r["tp"]["losses"], r["fsdp"]["losses"], "tp")


def test_every_method_learns_and_syncs_on_schedule(results):
    r = results[0]
    first = r["ddp_baseline"]["losses"][1]
    for name in ("diloco4", "streaming4", "streaming4_int4", "co2", "co2_penalty", "co2_clip"):
        losses = r[name]["losses"]
        assert losses[1] == pytest.approx(first, rel=RTOL), name  # the same first step as DDP
        assert losses[STEPS] < first, name
    synced = {name: [m["step"] for m in r[name]["metrics"] if m.get("sync_bytes")] for name in
              ("diloco4", "streaming4", "co2")}
    assert synced["diloco4"] == [2, 4, 6, 8]
    assert synced["streaming4"] == [2, 4, 6, 8]  # fragments 0, 1, 0, 1: each every H = 4 steps
    assert synced["co2"] == [4, 6, 8]  # one round late (and the last round at the end)


def test_streaming_peak_bytes_per_sync_is_a_fragment(results):
    r = results[0]
    peak = {name: max(m.get("sync_bytes", 0) for m in r[name]["metrics"]) for name in ("diloco4", "streaming4")}
    assert peak["streaming4"] <= peak["diloco4"] / 2
    int4 = max(m.get("sync_bytes", 0) for m in r["streaming4_int4"]["metrics"])
    assert int4 < peak["streaming4"] / 6


def test_co2_penalty_and_clipping_each_change_the_update(results):
    r = results[0]
    base = r["co2"]["losses"]
    for name in ("co2_penalty", "co2_clip"):
        got = r[name]["losses"]
        assert got[4] == base[4], name  # the first outer step lands after step 4
        assert got[STEPS] != pytest.approx(base[STEPS], rel=1e-6), name


def test_warm_start_begins_at_the_checkpoint_weights_on_another_layout(results):
    ddp_final = results[0]["ddp_baseline"]["val"][STEPS]
    warm = results[0]["warm_start"]
    assert warm[0] == pytest.approx(ddp_final, rel=1e-5)
    assert warm[STEPS] < warm[0]  # and it trains on from there


def test_streaming_resume_with_an_exchange_in_flight_is_exact(results):
    out = results[0]["resume"]
    assert {s: out["full"][s] for s in out["resumed"]} == out["resumed"]
