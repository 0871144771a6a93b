"""bf16 under FSDP: parameters gathered and computed in bf16 (half the all-gather bytes, as
counted), gradients reduced and master weights kept in fp32, and a 200-step run that follows
the fp32 run's validation curve within 1%. Every layout family trains in bf16 too."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from plait.errors import ConfigError
from plait.launch import spawn
from plait.train.trainer import run_training
from tests.parallel.harness import job, write_corpus

STEPS, EVAL_EVERY = 200, 20
MOE = {"model.moe_experts": 4, "model.moe_top_k": 2, "model.moe_ffn_dim": 64, "train.micro_batch": 1}
# On 4 ranks, a few steps each: bf16 with fp32 and with bf16 reduction beside the fp32 run.
# (FSDP alone is the 200-step run's layout.)
LAYOUTS = {
    "hsdp2x2": {"parallel.dp_replicate": 2},
    "tp2_dp2": {"parallel.tp": 2},
    "pp2_tp2": {"parallel.pp": 2, "parallel.tp": 2},
    "cp2_dp2": {"parallel.cp": 2},
    "ep2_dp4": {**MOE, "parallel.ep": 2},
}
SHORT = 3
# The 200-step runs use a 2-layer model of the harness's width: the curve, not the depth, is
# what they compare.
SMALL = {"model.n_layers": 2}


def fp32_and_bf16(workdir: str) -> dict[str, dict]:
    """Inside a spawned rank: the same FSDP run in fp32 and in bf16 (fp32 reduction)."""
    out = {}
    for dtype in ("fp32", "bf16"):
        cfg = job(workdir, f"precision_{dtype}", **{"parallel.nproc": dist.get_world_size(), "train.dtype": dtype,
                                                     "train.steps": STEPS, "train.eval_every": EVAL_EVERY, **SMALL})
        result = run_training(cfg)
        out[dtype] = {"val": result.val_losses, "ops": result.comm_op_bytes[2], "state": result.model_state_bytes}
    return out


def layouts_in_bf16(workdir: str) -> dict[str, dict]:
    """Inside a spawned rank: every layout for a few steps in fp32, bf16, and bf16 with a bf16
    reduction where the layout shards with FSDP."""
    out = {}
    for name, values in LAYOUTS.items():
        for dtype, reduce in (("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16")):
            tag = f"{name}_{dtype}_{reduce}"
            overrides = {"parallel.nproc": dist.get_world_size(), "train.steps": SHORT, "train.eval_every": 0,
                         "train.dtype": dtype, "train.reduce_dtype": reduce, **values}
            try:
                cfg = job(workdir, tag, **overrides)
            except ConfigError:  # a bf16 reduction on a layout without FSDP: refused up front
                out[tag] = None
                continue
            out[tag] = run_training(cfg).losses
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("precision"))
    write_corpus(folder)
    return spawn(fp32_and_bf16, 2, (folder,))[0]


def test_bf16_parameters_halve_fsdp_all_gather_bytes(runs):
    fp32, bf16 = runs["fp32"]["ops"]["dp_shard/all_gather"], runs["bf16"]["ops"]["dp_shard/all_gather"]
    assert abs(bf16 / fp32 - 0.5) <= 0.02, (fp32, bf16)
    # The gradient reduction stays fp32 (train.reduce_dtype's default), and so do the master
    # weights and the optimizer state.
    assert runs["bf16"]["ops"]["dp_shard/reduce_scatter"] == runs["fp32"]["ops"]["dp_shard/reduce_scatter"]
    assert runs["bf16"]["state"] == runs["fp32"]["state"]


def test_bf16_follows_the_fp32_curve_within_one_percent(runs):
    fp32, bf16 = runs["fp32"]["val"], runs["bf16"]["val"]
    assert sorted(fp32) == sorted(bf16) == list(range(0, STEPS + 1, EVAL_EVERY))
    assert fp32[STEPS] < fp32[0] - 1.0  # it learns: the comparison is not between two flat lines
    for step in fp32:
        assert abs(bf16[step] - fp32[step]) / fp32[step] <= 0.01, (step, fp32[step], bf16[step])
    assert any(bf16[step] != fp32[step] for step in fp32)  # bf16 really ran


def test_every_layout_trains_in_bf16(tmp_path):
    write_corpus(str(tmp_path))
    got = spawn(layouts_in_bf16, 4, (str(tmp_path),))[0]
    for name in LAYOUTS:
        fp32 = got[f"{name}_fp32_fp32"]
        for reduce in ("fp32", "bf16"):
            bf16 = got[f"{name}_bf16_{reduce}"]
            if bf16 is None:
                assert reduce == "bf16" and name == "pp2_tp2"  # the only layout here without FSDP
                continue
            assert sorted(bf16) == sorted(fp32) == list(range(1, SHORT + 1))
            for step in fp32:
                assert abs(bf16[step] - fp32[step]) / fp32[step] <= 0.02, (name, reduce, step, fp32, bf16)
            assert bf16 != fp32, (name, reduce)
