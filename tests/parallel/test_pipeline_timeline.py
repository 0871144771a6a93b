"""The pipeline timeline: theory values, the bubble arithmetic, the Gantt PNG, and a 2-rank
run of plait's pipeline (1f1b, interleaved 1f1b, zbv) recording the schedule's compute calls.

Timing ratios are not asserted here (the machine is shared and noisy): bench/bubble.py does.
"""

from __future__ import annotations

import math

import pytest
import torch.distributed as dist

from plait.launch import spawn
from plait.telemetry.timeline import (
    PipelineTimeline, align_timelines, plot_gantt, rank_bubbles, replay, step_bubble, theory_bubble,
    theory_bubble_issue,
)
from tests.parallel.harness import job, write_corpus

M = 4  # micro-batches per step: harness global_batch 8 / micro_batch 2


def test_theory_bubble():
    assert theory_bubble("1f1b", 2, 4, 1) == pytest.approx(1 / 5)
    assert theory_bubble("gpipe", 4, 8, 1) == pytest.approx(3 / 11)
    assert theory_bubble("1f1b", 1, 8, 1) == 0.0
    assert theory_bubble("interleaved_1f1b", 2, 4, 2) == pytest.approx(1 / 9)
    assert theory_bubble("interleaved_1f1b", 4, 8, 2) == pytest.approx(3 / 19)
    assert theory_bubble("looped_bfs", 2, 8, 2) == pytest.approx(1 / 17)
    # zero-bubble schedules: the interleaved value, as an upper bound
    for name in ("interleaved_zero_bubble", "zbv", "dualpipev"):
        assert theory_bubble(name, 4, 8, 2) == theory_bubble("interleaved_1f1b", 4, 8, 2)
    # v = 1 makes the interleaved formula the 1F1B one
    assert theory_bubble("interleaved_1f1b", 4, 8, 1) == theory_bubble("1f1b", 4, 8, 1)
    # the issue's literal form: 1F1B's value divided by v
    assert theory_bubble_issue("interleaved_1f1b", 2, 4, 2) == pytest.approx(1 / 10)
    assert theory_bubble_issue("1f1b", 2, 4, 1) == theory_bubble("1f1b", 2, 4, 1)
    with pytest.raises(ValueError):
        theory_bubble("1f1b", 2, 4, 2)
    with pytest.raises(ValueError):
        theory_bubble("nope", 2, 4, 1)


def _timeline(rank: int, intervals, begin=0.0, end=None) -> dict:
    end = max(e for *_, e in intervals) if end is None else end
    busy = sum(e - s for *_, s, e in intervals)
    return {"rank": rank, "intervals": intervals, "begin": begin, "end": end, "busy_s": busy,
            "step_s": end - begin, "bubble": 1 - busy / (end - begin)}


def test_bubble_arithmetic():
    # GPipe-like, p = 2, m = 2, F = 1, B = 2: each rank is busy 6 of a 9-long window.
    r0 = _timeline(0, [("F", 0, 0, 10, 11), ("F", 0, 1, 11, 12), ("B", 0, 0, 15, 17), ("B", 0, 1, 17, 19)])
    r1 = _timeline(1, [("F", 1, 0, 11, 12), ("F", 1, 1, 12, 13), ("B", 1, 0, 13, 15), ("B", 1, 1, 15, 17)])
    assert rank_bubbles([r0, r1]) == pytest.approx([1 / 3, 1 / 3])
    assert step_bubble([r0, r1]) == pytest.approx(1 / 3)
    assert step_bubble([r0, r1]) == pytest.approx(theory_bubble("gpipe", 2, 2, 1))
    aligned = align_timelines([r1, r0])
    assert [t["rank"] for t in aligned] == [0, 1]
    assert aligned[0]["intervals"][0][3] == 0.0 and aligned[1]["intervals"][-1][4] == 7.0
    by_begin = align_timelines([r0, _timeline(1, r1["intervals"], begin=10.5)], align="begin")
    assert by_begin[1]["intervals"][0][3] == pytest.approx(0.5)


def test_replay_removes_waits_and_balances():
    # The GPipe step above with 0.5 of communication delay before each dependent op.
    r0 = _timeline(0, [("F", 0, 0, 0, 1), ("F", 0, 1, 1, 2), ("B", 0, 0, 5.5, 7.5), ("B", 0, 1, 8, 10)])
    r1 = _timeline(1, [("F", 1, 0, 1.5, 2.5), ("F", 1, 1, 2.5, 3.5), ("B", 1, 0, 3.5, 5.0), ("B", 1, 1, 5, 7.5)])
    free = replay([r0, r1])
    assert [iv[3:] for iv in free[0]["intervals"]] == [(0, 1), (1, 2), (4.5, 6.5), (7, 9)]
    assert step_bubble(free) < step_bubble([r0, r1])
    balanced = replay([r0, r1], balanced=True)  # F = 1, B = 2 everywhere
    assert step_bubble(balanced) == pytest.approx(theory_bubble("gpipe", 2, 2, 1))


class _FakeStage:
    """The three entry points the schedules call, with the attributes attach reads."""

    def __init__(self, index: int):
        self.stage_index, self.group_rank, self.is_last = index, 0, True
        self.calls = []

    def forward_one_chunk(self, fwd_chunk_id, args, kwargs=None, save_forward_output=True):
        self.calls.append(("F", fwd_chunk_id))
        return fwd_chunk_id

    def backward_one_chunk(self, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
        self.calls.append(("B", bwd_chunk_id))
        self.forward_one_chunk(99, ())  # a nested call is not recorded twice

    def backward_weight_one_chunk(self, bwd_chunk_id, last_backward=False):
        self.calls.append(("W", bwd_chunk_id))


class _FakeSchedule:
    def _maybe_compute_loss(self, stage, output, target_mbs, mb_index, loss_kwargs=None):
        stage.calls.append(("L", mb_index))


def test_attach_records_and_detaches():
    stage, sched = _FakeStage(3), _FakeSchedule()
    timeline = PipelineTimeline().attach([stage], sched)
    assert "forward_one_chunk" in stage.__dict__ and "forward_one_chunk" not in vars(_FakeStage(0))
    timeline.step_begin()
    assert stage.forward_one_chunk(0, ()) == 0
    sched._maybe_compute_loss(stage, None, None, 0)
    stage.backward_one_chunk(0, full_backward=False)
    stage.backward_weight_one_chunk(bwd_chunk_id=0)
    local = timeline.step_end()
    assert [iv[:3] for iv in local["intervals"]] == [("F", 3, 0), ("B", 3, 0), ("W", 3, 0)]
    assert 0 <= local["bubble"] < 1 and local["busy_s"] <= local["step_s"]
    assert timeline.gather() == align_timelines([local])  # one process: no collective

    timeline.enabled = False
    timeline.step_begin()
    stage.forward_one_chunk(1, ())
    assert timeline.step_end()["intervals"] == []
    timeline.detach()
    assert "forward_one_chunk" not in stage.__dict__ and "_maybe_compute_loss" not in sched.__dict__


def test_plot_gantt_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    r0 = _timeline(0, [("F", 0, 0, 0.000, 0.010), ("F", 2, 0, 0.010, 0.020), ("B", 2, 0, 0.040, 0.055),
                       ("W", 2, 0, 0.055, 0.060), ("B", 0, 0, 0.080, 0.100)])
    r1 = _timeline(1, [("F", 1, 0, 0.012, 0.022), ("F", 3, 0, 0.022, 0.032), ("B", 3, 0, 0.032, 0.047),
                       ("B", 1, 0, 0.060, 0.080)])
    path = tmp_path / "gantt.png"
    plot_gantt([r1, r0], str(path), "test")
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ two ranks

LAYOUTS = {
    "1f1b": {"parallel.pp_schedule": "1f1b", "parallel.pp_virtual_stages": 1},
    "interleaved_1f1b": {"parallel.pp_schedule": "interleaved_1f1b", "parallel.pp_virtual_stages": 2},
    "zbv": {"parallel.pp_schedule": "zbv", "parallel.pp_virtual_stages": 2},
}


def _run_timelines(workdir: str) -> dict:
    """Inside a spawned rank: two training steps of each layout with the timeline attached."""
    from plait.train.trainer import Trainer

    out = {}
    for name, values in LAYOUTS.items():
        cfg = job(workdir, f"timeline_{name}", **{"parallel.nproc": 2, "parallel.pp": 2,
                                                  "parallel.dp_shard": -1, **values})
        trainer = Trainer(cfg)
        runner = trainer.pipeline
        timeline = PipelineTimeline().attach(runner.stages, runner.schedule)
        steps = []
        for _ in range(2):
            dist.barrier()
            timeline.step_begin()
            loss, _ = trainer.train_step(trainer.loader.next_step())
            local = timeline.step_end()
            steps.append({"local": local, "ranks": timeline.gather(runner.group), "loss": loss})
        to_zero = timeline.gather(runner.group, dst=0)
        steps[-1]["dst0"] = to_zero
        timeline.detach()
        out[name] = steps
    return out


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("timeline"))
    write_corpus(workdir)
    return spawn(_run_timelines, 2, (workdir,))


def _expected_1f1b(stage: int, n_stages: int, m: int) -> list[tuple[str, int]]:
    """The order torch's Schedule1F1B runs on ``stage``: warm-up forwards, then B/F pairs."""
    warmup = min(m, n_stages - stage)
    order = [("F", i) for i in range(warmup)]
    f, b = warmup, 0
    while b < m:
        order.append(("B", b))
        b += 1
        if f < m:
            order.append(("F", f))
            f += 1
    return order


def _check_common(ranks: list[dict], n_stages: int, kinds: str) -> None:
    assert [t["rank"] for t in ranks] == [0, 1]
    stages_seen = set()
    for t in ranks:
        ivs = t["intervals"]
        assert ivs, f"rank {t['rank']} recorded nothing"
        for (_, _, _, s0, e0), (_, _, _, s1, e1) in zip(ivs, ivs[1:]):
            assert s0 <= e0 <= s1 <= e1, f"rank {t['rank']}: overlapping or unordered intervals"
        for stage in {iv[1] for iv in ivs}:
            stages_seen.add(stage)
            for kind in kinds:
                mbs = sorted(mb for k, s, mb, *_ in ivs if k == kind and s == stage)
                assert mbs == list(range(M)), f"stage {stage} {kind}: micro-batches {mbs}"
            for mb in range(M):
                f_end = next(e for k, s, b, _, e in ivs if (k, s, b) == ("F", stage, mb))
                b_start = next(s0 for k, s, b, s0, _ in ivs if (k, s, b) == ("B", stage, mb))
                assert f_end <= b_start, f"stage {stage} mb {mb}: backward before forward"
    assert stages_seen == set(range(n_stages))
    # Causality across ranks (same-machine clocks): stage s+1's forward of a micro-batch starts
    # after stage s's ends, and stage s's backward after stage s+1's.
    by_key = {(k, s, mb): (a, b) for t in ranks for k, s, mb, a, b in t["intervals"]}
    for s in range(n_stages - 1):
        for mb in range(M):
            assert by_key[("F", s + 1, mb)][0] >= by_key[("F", s, mb)][1]
            assert by_key[("B", s, mb)][0] >= by_key[("B", s + 1, mb)][1]
    bubble = step_bubble(ranks)
    assert 0.0 <= bubble < 1.0 and all(0.0 <= b < 1.0 for b in rank_bubbles(ranks))


def test_1f1b_timeline(recorded):
    for rank, steps in enumerate(recorded):
        for step in steps["1f1b"]:
            local = step["local"]
            assert local["rank"] == rank
            assert [(k, mb) for k, s, mb, *_ in local["intervals"]] == _expected_1f1b(rank, 2, M)
            assert {s for _, s, *_ in local["intervals"]} == {rank}
            assert 0.0 <= local["bubble"] < 1.0 and 0 < local["busy_s"] < local["step_s"]
            assert math.isfinite(step["loss"])
    for step in recorded[0]["1f1b"]:
        _check_common(step["ranks"], 2, "FB")
        # The recorded order, re-timed as a balanced pipeline, has exactly the textbook bubble.
        assert step_bubble(replay(step["ranks"], balanced=True)) == pytest.approx(theory_bubble("1f1b", 2, M, 1))
        assert step["ranks"] == recorded[1]["1f1b"][recorded[0]["1f1b"].index(step)]["ranks"]
    assert recorded[0]["1f1b"][-1]["dst0"] == recorded[0]["1f1b"][-1]["ranks"]
    assert recorded[1]["1f1b"][-1]["dst0"] is None


def test_interleaved_timeline(recorded):
    for step in recorded[0]["interleaved_1f1b"]:
        _check_common(step["ranks"], 4, "FB")
        assert step_bubble(replay(step["ranks"], balanced=True)) == pytest.approx(
            theory_bubble("interleaved_1f1b", 2, M, 2))
        for t in step["ranks"]:  # loop placement: rank r holds stages r and r + 2
            assert {s for _, s, *_ in t["intervals"]} == {t["rank"], t["rank"] + 2}
            assert not any(k == "W" for k, *_ in t["intervals"])


def test_zero_bubble_records_weight_grads(recorded):
    for step in recorded[0]["zbv"]:
        _check_common(step["ranks"], 4, "FBW")
        # theory_bubble's interleaved value is an upper bound for the zero-bubble schedules
        assert step_bubble(replay(step["ranks"], balanced=True)) <= theory_bubble("zbv", 2, M, 2)
        for t in step["ranks"]:  # V placement: rank r holds stages r and 3 - r
            assert {s for _, s, *_ in t["intervals"]} == {t["rank"], 3 - t["rank"]}
