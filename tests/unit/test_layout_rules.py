"""plait/layout.py is the one home of the layout rules: the planner ranks only layouts the trainer's
config validation accepts, and every list of pipeline schedules is its table."""

from __future__ import annotations

import json
import typing

import pytest
import torch.distributed.pipelining.schedules as torch_schedules
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plait.config import ParallelConfig, build_config, validate
from plait.errors import ConfigError
from plait.layout import (
    PP_MULTI_STAGE, PP_SCHEDULES, PP_V_SHAPED, SCHEDULES, Degrees, Layout, Workload, check_layout, layout_problem,
)
from plait.parallel.pipeline import SCHEDULES as PIPELINE_CLASSES
from plait.plan.auto import with_layout
from plait.plan.search import search
from plait.plan.spec import PlanCluster, PlanModel, PlanTrain, build_cluster
from plait.layout import bubble_seconds
from plait.telemetry.timeline import _SINGLE, theory_bubble


def test_schedule_table_is_the_trainers_and_torchs():
    assert tuple(typing.get_args(typing.get_type_hints(ParallelConfig)["pp_schedule"])) == PP_SCHEDULES
    for sched in SCHEDULES.values():
        assert isinstance(getattr(torch_schedules, sched.torch_class), type), sched.torch_class
        assert PIPELINE_CLASSES[sched.name] == sched.torch_class
    assert set(PP_V_SHAPED) == {"zbv", "dualpipev"} and set(PP_V_SHAPED) <= set(PP_MULTI_STAGE)
    assert set(_SINGLE) == set(PP_SCHEDULES) - set(PP_MULTI_STAGE)


def test_the_timeline_and_the_planner_read_one_bubble_formula():
    """The timeline's ideal idle fraction is the table's bubble before weight-gradient filling,
    so the planner's zero-bubble estimate (with filling) never exceeds it."""
    p, m, f, b = 4, 8, 1.0, 2.0
    for name, sched in SCHEDULES.items():
        v = 1 if name in _SINGLE else 2
        unfilled = bubble_seconds(sched.unfilled or name, p, v, f, b)
        assert theory_bubble(name, p, m, v) == pytest.approx(unfilled / (m * (f + b) + unfilled))
        assert bubble_seconds(name, p, v, f, b) <= unfilled
        assert (bubble_seconds(name, p, v, f, b) < unfilled) == sched.zero_bubble


def test_rules_the_planner_used_to_miss():
    work = Workload(n_layers=8, n_heads=8, n_kv_heads=0, ffn_dim=64, seq_len=64, global_batch=8, micro_batch=1)
    # tp with replicated data parallelism
    assert "replicated data parallelism" in layout_problem(Degrees(world=8, tp=2, zero=1), work)
    assert layout_problem(Degrees(world=8, tp=2, zero=2), work) is None
    # 1f1b needs at least pp micro-batches per step
    few = Workload(**{**work.__dict__, "global_batch": 2})
    assert "at least parallel.pp = 4" in layout_problem(Degrees(world=4, pp=4, zero=0), few)
    # zigzag cuts the sequence into 2 x cp chunks whatever the cp mode
    short = Workload(**{**work.__dict__, "seq_len": 4})
    assert "cuts it into 8 chunks" in layout_problem(Degrees(world=4, cp=4, cp_mode="ulysses"), short)
    tied = Workload(**{**work.__dict__, "tie_embeddings": True})
    assert "tie_embeddings" in layout_problem(Degrees(world=2, pp=2), tied)
    moe = Workload(**{**work.__dict__, "moe_experts": 4})
    assert "cp > 1" in layout_problem(Degrees(world=2, cp=2), moe)
    with pytest.raises(ConfigError, match="dp_shard = 1"):
        check_layout(Degrees(world=4, dp_replicate=4, ep=2), moe)


def test_fixed_layout_plait_refuses_is_marked():
    from tests.unit.test_plan import MODEL_ARGS, plan_cli

    fixed = "tp=8,pp=2,vpp=1,dp=4,cp=1,ep=1,mbs=1,zero=1,recompute=full"  # Megatron runs it, plait does not
    code, out = plan_cli(*MODEL_ARGS, "--json", "--layout", fixed)
    [only] = json.loads(out)["layouts"]
    assert code == 0 and only["plait_train"].startswith("refused: parallel.tp = 8 with replicated data parallelism")
    code, out = plan_cli(*MODEL_ARGS, "--json", "--top", "50")
    layouts = json.loads(out)["layouts"]
    assert code == 0 and layouts and all(x["plait_train"] == "ok" for x in layouts)
    assert all(x["recompute"] != "selective" for x in layouts)


@st.composite
def jobs(draw):
    heads = draw(st.sampled_from([1, 2, 4, 6, 8, 16]))
    kv = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    head_dim = draw(st.sampled_from([2, 4, 8, 16]))
    experts = draw(st.sampled_from([0, 0, 2, 4, 8]))
    model = PlanModel(n_layers=draw(st.integers(1, 12)), dim=heads * head_dim, n_heads=heads, n_kv_heads=kv,
                      ffn_dim=draw(st.sampled_from([8, 12, 16, 24, 32, 48, 64])),
                      vocab_size=draw(st.integers(32, 300)), mlp="swiglu", tie_embeddings=draw(st.booleans()),
                      moe_experts=experts, moe_top_k=min(experts, draw(st.integers(1, 2))) or 2)
    gpus = draw(st.sampled_from([1, 2, 4, 8, 16]))
    per_node = draw(st.sampled_from([d for d in (1, 2, 4, 8) if d <= gpus]))
    gpu = draw(st.sampled_from(["cpu", "a100-80gb"]))
    train = PlanTrain(global_batch=draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16, 32, 64])),
                      seq_len=draw(st.sampled_from([8, 12, 16, 32, 48, 64, 128])),
                      cp_mode=draw(st.sampled_from(["ring", "ulysses"])))
    return model, train, PlanCluster(gpu=gpu, gpus=gpus, gpus_per_node=per_node)


def job_config(model: PlanModel, train: PlanTrain, world: int):
    return build_config(values={
        "parallel.layout": "auto", "parallel.nproc": world, "parallel.cp_mode": train.cp_mode,
        "train.device": "cpu", "train.seq_len": train.seq_len, "train.global_batch": train.global_batch,
        "model.n_layers": model.n_layers, "model.dim": model.dim, "model.n_heads": model.n_heads,
        "model.n_kv_heads": model.n_kv_heads, "model.ffn_dim": model.ffn_dim, "model.vocab_size": model.vocab_size,
        "model.max_seq_len": max(train.seq_len, 16), "model.tie_embeddings": model.tie_embeddings,
        "model.moe_experts": model.moe_experts, "model.moe_top_k": model.moe_top_k,
    })


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs())
def test_every_ranked_layout_is_one_plait_train_accepts(job):
    model, train, cluster_spec = job
    result = search(model, train, build_cluster(cluster_spec))
    assert not result.refused
    cfg = job_config(model, train, cluster_spec.gpus)
    ranked = result.ranked
    step = max(1, len(ranked) // 25)  # a sample of long rankings, the best ones always
    for est in ranked[:5] + ranked[5::step]:
        assert isinstance(est.layout, Layout) and est.layout.recompute != "selective"
        candidate = with_layout(cfg, est)
        validate(candidate, cluster_spec.gpus)  # raises ConfigError if the trainer refuses it
