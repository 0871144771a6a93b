"""Scale-ready model state: every layout builds on meta and materializes only its shards, and
its step-0 weights, gathered, are bitwise the single-process init.

One spawned group of 8 ranks builds every layout in turn (building is cheap: no training).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from plait.checkpoint.store import full_model_state
from plait.launch import spawn
from plait.models.llama import build_model, init_source
from plait.parallel.dims import ParallelDims
from plait.parallel.parallelize import parallelize_llama
from tests.parallel.harness import job, write_corpus

MOE = {"model.moe_experts": 4, "model.moe_top_k": 2, "model.moe_ffn_dim": 64, "model.moe_shared_ffn_dim": 32,
       "model.moe_shared_gate": True}
# Every layout family on 8 ranks. The harness model has 300 vocabulary rows: FSDP over 8 shards
# them unevenly, and 2 experts per ep rank over 4 edp ranks leave two ranks an empty shard.
BASE = {"model.vocab_size": 300, "train.global_batch": 16, "train.micro_batch": 1}
LAYOUTS = {
    "fsdp8": {},
    "hsdp2x4": {"parallel.dp_replicate": 2},
    "ddp8": {"parallel.dp_replicate": 8, "parallel.dp_shard": 1, "parallel.zero": 0},
    "zero1_8": {"parallel.zero": 1},
    "tp4_dp2": {"parallel.tp": 4},
    "pp2_dp4": {"parallel.pp": 2},
    "pp4v2_dp2": {"parallel.pp": 4, "parallel.pp_schedule": "interleaved_1f1b", "parallel.pp_virtual_stages": 2},
    "zbv_pp2_dp4": {"parallel.pp": 2, "parallel.pp_schedule": "zbv", "parallel.pp_virtual_stages": 2},
    "cp2_dp4": {"parallel.cp": 2},
    "ep2_dp8": {**MOE, "parallel.ep": 2},
    "ep4_tp2": {**MOE, "parallel.ep": 4, "parallel.tp": 2},
    "pp2_tp2_dp2": {"parallel.pp": 2, "parallel.tp": 2},
    "hsdp2x2_tp2": {"parallel.dp_replicate": 2, "parallel.tp": 2},
}


def gathered_init(workdir: str) -> dict[str, dict]:
    """Inside a spawned rank: each layout's step-0 weights, gathered to rank 0."""
    out = {}
    for name, values in LAYOUTS.items():
        cfg = job(workdir, name, **{"parallel.nproc": dist.get_world_size(), **BASE, **values})
        dims = ParallelDims.from_config(cfg, dist.get_world_size())
        dims.build_mesh("cpu")
        parts, _ = parallelize_llama(cfg, dims, torch.device("cpu"), init_source(cfg.model, cfg.train.seed))
        state = full_model_state(parts, dims.group("pp") if dims.pp_enabled else None)
        if dist.get_rank() == 0:
            # numpy: tensors would travel back as shared memory of a process about to exit.
            out[name] = {key: value.numpy().copy() for key, value in state.items()}
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sharded_init"))
    write_corpus(folder)
    return folder


def test_every_layout_starts_from_the_single_process_init(workdir):
    got = spawn(gathered_init, 8, (workdir,))[0]
    for name, values in LAYOUTS.items():
        model_values = {key: value for key, value in values.items() if key.startswith("model.")}
        cfg = job(workdir, name, **{**BASE, **model_values})
        want = build_model(cfg.model, seed=cfg.train.seed).state_dict()
        assert sorted(got[name]) == sorted(want), name
        for key, tensor in want.items():
            assert torch.equal(torch.from_numpy(got[name][key]), tensor), f"{name}: {key} differs from the single-process init"


def test_init_depends_on_the_seed_and_the_parameter():
    """Guards the test above: different seeds and different parameters get different values."""
    cfg = job("/nonexistent", "seed", **{"model.vocab_size": 300}).model
    a, b = build_model(cfg, seed=0).state_dict(), build_model(cfg, seed=1).state_dict()
    assert not torch.equal(a["layers.0.attention.wq.weight"], b["layers.0.attention.wq.weight"])
    assert not torch.equal(a["layers.0.attention.wq.weight"], a["layers.1.attention.wq.weight"])
