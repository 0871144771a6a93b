"""Every parallel layout against the single-process reference (fp32, same seed and data).

Cases are grouped by world size so one spawned group of ranks trains all of its layouts in
turn. Loss, validation loss and global gradient norm must match within RTOL at every step.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from plait.data.balanced_loader import BalancedLoader
from plait.launch import spawn
from plait.train.trainer import Trainer, TrainResult, run_training
from tests.parallel.harness import RTOL, STEPS, job, roll_back, run_layouts, run_resume, write_corpus

SHORT = 10  # steps for the model-parallel cases (the issue asks 10+; data parallel runs STEPS)
# Rows of 128 tokens (the model's limit) hold several documents and padding, not one 32-token piece.
BALANCED = {"data.batching": "balanced", "train.seq_len": 128, "train.steps": SHORT}


CP_STEPS = 5  # context parallel: "a few steps", every mode and combination


def cp(degree: int, mode: str = "ring", **extra) -> dict:
    return {"parallel.cp": degree, "parallel.cp_mode": mode, "train.steps": CP_STEPS, **extra}


NO_DOCS = {"data.doc_mask": False}
CONTIGUOUS = {"parallel.cp_shard": "contiguous"}
GQA = {"model.n_kv_heads": 2}  # 2 KV heads under Ulysses 4: each is repeated to two ranks


# Gated linear attention: every layer GLA, or three GLA layers then one softmax (hybrid). The
# 32-token sequences make 16-token chunks: several per rank at cp2, one at cp4.
GLA = {"model.attention": "gla", "model.gla_chunk": 16}
HYBRID = {"model.layer_pattern": "gggs", "model.gla_chunk": 16}


def lasp2(degree: int, model: dict, **extra) -> dict:
    """LASP-2 for the GLA layers (cp_mode auto: ring for a hybrid model's softmax layers)."""
    return {"parallel.cp": degree, "train.steps": CP_STEPS, **model, **extra}


MOE_STEPS = 10


def moe(micro_batch: int = 2, **extra) -> dict:
    """A 4-expert top-2 model. Under the global-batch balance scope (the default) each rank
    runs one micro-batch (``micro_batch`` = its share of the 8-sequence global batch), so the
    counts all-reduced over ranks are the whole batch's, as in the reference's one big
    micro-batch (see ``reference_values``)."""
    return {"model.moe_experts": 4, "model.moe_top_k": 2, "model.moe_ffn_dim": 64, "model.moe_shared_ffn_dim": 32,
            "model.moe_shared_gate": True, "train.micro_batch": micro_batch,
            "train.steps": MOE_STEPS, **extra}


MICRO_SCOPE = {"moe.balance_scope": "micro_batch"}
CAPACITY = {"model.moe_dispatch": "capacity", "model.moe_capacity_factor": 1.0}


def pp(schedule: str, degree: int, v: int = 1, **extra) -> dict:
    return {"parallel.pp": degree, "parallel.pp_schedule": schedule, "parallel.pp_virtual_stages": v,
            "parallel.dp_shard": -1, "train.steps": SHORT, **extra}


MEMORY_STEPS = 5  # offload and recompute move memory, not arithmetic: a few steps each


def memory(offload: str = "none", **extra) -> dict:
    """Memory options (plait/parallel/activation_offload.py, token_recompute.py, FSDP2 CPU offload)."""
    return {"memory.offload": offload, "train.steps": MEMORY_STEPS, **extra}


ACT_OFFLOAD = {"memory.activation_offload": -1}
TOKENWISE = {"memory.recompute_fraction": 0.5}


CASES = {
    2: {
        "ddp2": {"parallel.dp_replicate": 2, "parallel.dp_shard": 1},
        "fsdp2": {"parallel.dp_shard": 2},
        "balanced_fsdp2": {"parallel.dp_shard": 2, **BALANCED},
        "zero0": {"parallel.dp_shard": 2, "parallel.zero": 0, "train.steps": SHORT},
        "zero1": {"parallel.dp_shard": 2, "parallel.zero": 1, "train.steps": SHORT},
        "zero2": {"parallel.dp_shard": 2, "parallel.zero": 2, "train.steps": SHORT},
        "tp2": {"parallel.tp": 2, "train.steps": SHORT},
        "fsdp2_ac_op": {"parallel.dp_shard": 2, "train.activation_checkpointing": "op", "train.steps": SHORT},
        "tp2_ac_full": {"parallel.tp": 2, "train.activation_checkpointing": "full", "train.steps": SHORT},
        "pp2_gpipe": pp("gpipe", 2),
        "pp2_1f1b": pp("1f1b", 2),
        "pp2_interleaved_1f1b": pp("interleaved_1f1b", 2, 2),
        "pp2_looped_bfs": pp("looped_bfs", 2, 2),
        "pp2_interleaved_zero_bubble": pp("interleaved_zero_bubble", 2, 2),
        "pp2_zbv": pp("zbv", 2, 2),
        "pp2_dualpipev": pp("dualpipev", 2, 2),
        "cp2_ring": cp(2, **CONTIGUOUS),
        "cp2_ring_nodocs": cp(2, **CONTIGUOUS, **NO_DOCS),
        "cp2_ring_zigzag": cp(2),
        "cp2_ring_zigzag_nodocs": cp(2, **NO_DOCS),
        "cp2_ulysses": cp(2, "ulysses"),
        "cp2_ulysses_nodocs": cp(2, "ulysses", **NO_DOCS),
        "gla_cp2": lasp2(2, GLA),
        "gla_cp2_nodocs": lasp2(2, GLA, **NO_DOCS),
        "hybrid_cp2": lasp2(2, HYBRID),
        "hybrid_cp2_nodocs": lasp2(2, HYBRID, **NO_DOCS),
        "gla_tp2": {**GLA, "parallel.tp": 2, "train.steps": CP_STEPS},
        "moe_fsdp2": moe(4),
        "moe_ep2": moe(4, **{"parallel.ep": 2}),
        "moe_ep2_micro_scope": moe(2, **{"parallel.ep": 2}, **MICRO_SCOPE),
        "moe_ep2_capacity": moe(2, **{"parallel.ep": 2}, **MICRO_SCOPE, **CAPACITY),
        "moe_tp2": moe(2, **{"parallel.tp": 2}, **MICRO_SCOPE),
        "fsdp2_offload_params": memory("params", **{"parallel.dp_shard": 2}),
        "ddp2_offload_params": memory("params", **{"parallel.dp_replicate": 2, "parallel.dp_shard": 1}),
        "zero1_offload_optimizer": memory("optimizer", **{"parallel.dp_shard": 2, "parallel.zero": 1}),
        "fsdp2_tokenwise_act_offload": memory(**{"parallel.dp_shard": 2, "memory.activation_offload": 4}, **TOKENWISE),
        "tp2_offload_params_act": memory("params", **{"parallel.tp": 2}, **ACT_OFFLOAD),
        "pp2_offload_params_act": {**pp("1f1b", 2), **memory("params", **ACT_OFFLOAD)},
    },
    4: {
        "ddp4": {"parallel.dp_replicate": 4, "parallel.dp_shard": 1},
        "fsdp4": {"parallel.dp_shard": 4},
        "hsdp2x2": {"parallel.dp_replicate": 2, "parallel.dp_shard": 2},
        "tp4": {"parallel.tp": 4, "train.steps": SHORT},
        "dp2_tp2": {"parallel.tp": 2, "train.steps": SHORT},
        "dp2_pp2": pp("1f1b", 2),
        "tp2_pp2": pp("1f1b", 2, **{"parallel.tp": 2}),
        "pp4_gpipe": pp("gpipe", 4),
        "pp4_1f1b": pp("1f1b", 4),
        "pp4_interleaved_1f1b": pp("interleaved_1f1b", 4, 2),
        "pp4_looped_bfs": pp("looped_bfs", 4, 2),
        "pp4_interleaved_zero_bubble": pp("interleaved_zero_bubble", 4, 2),
        "pp4_zbv": pp("zbv", 4, 2),
        # DualPipeV needs 2·pp = 8 micro-batches: micro-batches of 1 sequence. Validation
        # batches are built from micro-batches, so only training losses and norms compare.
        "pp4_dualpipev": pp("dualpipev", 4, 2, **{"train.micro_batch": 1}),
        "cp4_ring": cp(4, **CONTIGUOUS),
        "cp4_ring_nodocs": cp(4, **CONTIGUOUS, **NO_DOCS),
        "cp4_ring_zigzag": cp(4),
        "cp4_ring_zigzag_nodocs": cp(4, **NO_DOCS),
        "cp4_ulysses": cp(4, "ulysses"),
        "cp4_ulysses_nodocs": cp(4, "ulysses", **NO_DOCS),
        "cp4_ulysses_gqa": cp(4, "ulysses", **GQA),
        "cp4_hybrid": cp(4, "hybrid", **{"parallel.cp_ulysses": 2}),
        "cp4_hybrid_nodocs": cp(4, "hybrid", **{"parallel.cp_ulysses": 2}, **NO_DOCS),
        "gla_cp4": lasp2(4, GLA),
        "gla_cp4_nodocs": lasp2(4, GLA, **NO_DOCS),
        "gla_cp4_zigzag": lasp2(4, GLA, **{"parallel.cp_shard": "zigzag"}),
        "hybrid_cp4": lasp2(4, HYBRID),
        "hybrid_cp4_nodocs": lasp2(4, HYBRID, **NO_DOCS),
        "hybrid_cp4_ulysses": lasp2(4, HYBRID, **{"parallel.cp_mode": "ulysses"}),
        "gla_cp2_dp2": lasp2(2, GLA),
        "gla_cp2_tp2": lasp2(2, GLA, **{"parallel.tp": 2}),
        "gla_cp2_pp2": lasp2(2, GLA, **{"parallel.pp": 2, "parallel.pp_schedule": "1f1b"}),
        "hybrid_cp2_tp2": lasp2(2, HYBRID, **{"parallel.tp": 2}),
        "cp2_dp2": cp(2),
        "cp2_ddp2": cp(2, **{"parallel.dp_replicate": 2, "parallel.dp_shard": 1, "parallel.zero": 0}),
        "cp2_tp2": cp(2, **{"parallel.tp": 2}),
        "cp2_pp2": cp(2, **{"parallel.pp": 2, "parallel.pp_schedule": "1f1b"}),
        "moe_ep4": moe(2, **{"parallel.ep": 4}),
        "moe_ep4_capacity": moe(2, **{"parallel.ep": 4}, **MICRO_SCOPE, **CAPACITY),
        "moe_ep2_dp2": moe(2, **{"parallel.ep": 2}),
        "moe_ep2_dp2_micro_scope": moe(2, **{"parallel.ep": 2}, **MICRO_SCOPE),
        "moe_ep2_tp2": moe(4, **{"parallel.ep": 2, "parallel.tp": 2}),
        "moe_ep2_pp2": moe(2, **{"parallel.ep": 2, "parallel.pp": 2, "parallel.pp_schedule": "1f1b"}, **MICRO_SCOPE),
        "moe_ep2_pp2_capacity": moe(2, **{"parallel.ep": 2, "parallel.pp": 2, "parallel.pp_schedule": "1f1b"},
                                    **MICRO_SCOPE, **CAPACITY),
        "hsdp2x2_offload_params": memory("params", **{"parallel.dp_replicate": 2, "parallel.dp_shard": 2}),
        "dp2_tp2_offload_params_act": memory("params", **{"parallel.tp": 2}, **ACT_OFFLOAD),
        "cp2_dp2_tokenwise_act_offload": memory(**{"parallel.cp": 2}, **TOKENWISE, **ACT_OFFLOAD),
    },
    8: {
        "dp2_tp2_pp2": pp("1f1b", 2, **{"parallel.tp": 2}),
        "hsdp2x2_tp2": {"parallel.dp_replicate": 2, "parallel.dp_shard": 2, "parallel.tp": 2, "train.steps": SHORT},
        "cp2_dp2_tp2": cp(2, "ulysses", **{"parallel.tp": 2}),
    },
}
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("parity"))
    write_corpus(folder)
    return folder


def reference_values(values: dict) -> dict:
    """What the single-process reference of a case shares with it: steps, model, data and
    MoE settings; for MoE with the global-batch balance scope, one micro-batch of the whole
    global batch, the scope's definition."""
    out = {k: v for k, v in values.items() if k == "train.steps" or k.startswith(("model.", "data.", "moe."))}
    if values.get("model.moe_experts"):
        global_scope = values.get("moe.balance_scope", "global_batch") == "global_batch"
        out["train.micro_batch"] = 8 if global_scope else values.get("train.micro_batch", 2)
    return out


def balanced_reference(workdir: str) -> TrainResult:
    """Balanced batching's reference for dp = 2. The assignment is made for the number of dp
    ranks, so the single process reads both ranks' rows in rank order, as dp = 2 splits them."""
    trainer = Trainer(job(workdir, "reference_balanced", **BALANCED))
    trainer.loader = BalancedLoader.for_job(trainer.cfg, trainer.data.train.store, n_ranks=2, ranks=[0, 1])
    return trainer.run()


@pytest.fixture(scope="module")
def references(workdir):
    """Single-process runs, keyed by what they share with a case (trained on first use)."""
    cache: dict[object, object] = {}

    def get(values: dict):
        if values.get("data.batching") == "balanced":
            key = "balanced"
            if key not in cache:
                cache[key] = balanced_reference(workdir)
            return cache[key]
        wanted = {"train.steps": STEPS, **reference_values(values)}
        key = tuple(sorted(wanted.items()))
        if key not in cache:
            cache[key] = run_training(job(workdir, f"reference{len(cache)}", **wanted))
        return cache[key]

    return get


def assert_close(name: str, got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want), f"{name}: logged steps differ"
    for step in want:
        rel = abs(got[step] - want[step]) / abs(want[step])
        assert rel <= RTOL, f"{name} step {step}: {got[step]!r} vs reference {want[step]!r} (rel {rel:.2e})"


def test_reference_learns(references):
    reference = references({})
    assert len(reference.losses) == STEPS
    assert reference.losses[STEPS] < reference.losses[1] - 0.5


def test_balanced_reference_reads_two_ranks_of_balanced_rows(workdir, references):
    """Guards the balanced case: its reference trained on balanced rows (packed windows never
    pad) assigned to 2 ranks (with one, imbalance is always 1)."""
    references(BALANCED)
    with open(os.path.join(workdir, "runs", "reference_balanced", "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if '"loss"' in line]
    assert len(rows) == SHORT
    assert any(r["padding"] > 0 for r in rows) and any(r["imbalance"] > 1 for r in rows)


@pytest.mark.parametrize("world", sorted(CASES), ids=[f"{w}ranks" for w in sorted(CASES)])
def test_layout_parity(workdir, references, world):
    layouts = CASES[world]
    results = spawn(run_layouts, world, (workdir, layouts))
    for name, values in layouts.items():
        reference = references(values)
        got = results[0][name]
        assert_close(f"{name} loss", got["losses"], reference.losses)
        if values.get("train.micro_batch", 2) == reference_values(values).get("train.micro_batch", 2) == 2:
            assert_close(f"{name} val_loss", got["val"], reference.val_losses)
        assert_close(f"{name} grad_norm", got["norms"], reference.grad_norms)
        for other in results[1:]:  # every rank reports the same global loss
            assert other[name]["losses"] == got["losses"], name


ONE_PROCESS_MEMORY = {
    "offload_optimizer": memory("optimizer"),
    "offload_params": memory("params"),  # FSDP2 on a one-rank group of its own
    "act_offload_ac_full": memory(**ACT_OFFLOAD, **{"train.activation_checkpointing": "full"}),
    "tokenwise_quarter": memory(**{"memory.recompute_fraction": 0.25}),
    "tokenwise_all_act_offload": memory(**{"memory.recompute_fraction": 1.0}, **ACT_OFFLOAD),
}


def test_memory_options_match_on_one_process(workdir, references):
    for name, values in ONE_PROCESS_MEMORY.items():
        got, reference = run_training(job(workdir, f"one_{name}", **values)), references(values)
        assert_close(f"{name} loss", got.losses, reference.losses)
        assert_close(f"{name} val_loss", got.val_losses, reference.val_losses)
        assert_close(f"{name} grad_norm", got.grad_norms, reference.grad_norms)
    assert not torch.distributed.is_initialized()  # the offload's own group is gone


def test_offload_checkpoints_resume_exactly_in_any_mode(workdir):
    """A checkpoint saved with FSDP2's CPU offload resumes bit-identically with it, with the host
    optimizer and with no offload: the checkpoint's layout is AdamW's own in every mode."""
    common = {"train.steps": SHORT, "checkpoint.every": 5, "checkpoint.keep": 5}
    name = "resume_offload"
    full = run_training(job(workdir, name, **common, **{"memory.offload": "params"})).losses
    for offload in ("params", "optimizer", "none"):
        roll_back(os.path.join(workdir, "runs", name), 5)
        resumed = run_training(job(workdir, name, **common, **{"memory.offload": offload,
                                                                "checkpoint.resume": True})).losses
        assert sorted(resumed) == list(range(6, SHORT + 1)), offload
        assert all(resumed[step] == full[step] for step in resumed), offload


@pytest.mark.parametrize("steps", [SHORT, STEPS])
def test_harness_is_not_chaotic(workdir, references, steps):
    """Guards the harness: weights perturbed by 1e-6 (relative, ten times fp32 rounding) move no
    logged loss or gradient norm by more than RTOL / 2, so a parity failure is a layout's error,
    not rounding amplified by the training dynamics."""
    trainer = Trainer(job(workdir, f"perturbed{steps}", **{"train.steps": steps}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.mul_(1 + 1e-6 * torch.randn(param.shape, generator=gen))
    got, reference = trainer.run(), references({"train.steps": steps})
    for step in reference.losses:
        for name, value, want in (("loss", got.losses[step], reference.losses[step]),
                                  ("grad_norm", got.grad_norms[step], reference.grad_norms[step])):
            assert abs(value - want) / abs(want) <= RTOL / 2, (name, step, value, want)
    assert got.losses != reference.losses or got.grad_norms != reference.grad_norms  # it was perturbed


def test_reference_differs_with_other_seed(workdir, references):
    """Guards the harness itself: a different seed must not pass as 'parity'."""
    other = run_training(job(workdir, "seed1", **{"train.seed": 1, "train.steps": SHORT}))
    reference = references({"train.steps": SHORT})
    assert abs(other.losses[2] - reference.losses[2]) / reference.losses[2] > RTOL


@pytest.mark.parametrize("world,zero,background", [(1, 3, False), (2, 3, False), (2, 1, False), (2, 3, True),
                                                     (2, "pp", False)],
                         ids=["1rank", "2ranks_fsdp", "2ranks_zero1", "2ranks_fsdp_async", "2ranks_pp"])
def test_resume_is_bit_identical(workdir, world, zero, background):
    """``background``: checkpoint.async, the checkpoints written while training goes on.
    ``pp``: two pipeline stages, whose optimizer param groups must not overwrite each other's."""
    if zero == "pp":
        values = {"parallel.pp": 2, "parallel.pp_schedule": "1f1b", "parallel.dp_shard": -1}
        out = spawn(run_resume, world, (workdir, values, "resume2_pp"))[0]
        full, resumed = out["full"], out["resumed"]
    elif background:
        values = {"parallel.dp_shard": 2, "parallel.zero": zero, "checkpoint.async": True}
        out = spawn(run_resume, world, (workdir, values, "resume2_async"))[0]
        full, resumed = out["full"], out["resumed"]
    elif world == 1:
        common = {"checkpoint.every": 10, "checkpoint.keep": 5}
        full = run_training(job(workdir, "resume1", **common)).losses
        roll_back(os.path.join(workdir, "runs", "resume1"), 10)
        resumed = run_training(job(workdir, "resume1", **common, **{"checkpoint.resume": True})).losses
    else:
        out = spawn(run_resume, world, (workdir, {"parallel.dp_shard": 2, "parallel.zero": zero}))[0]
        full, resumed = out["full"], out["resumed"]
    assert sorted(resumed) == list(range(11, STEPS + 1))
    for step in resumed:
        assert resumed[step] == full[step], f"step {step}: resumed {resumed[step]!r} != {full[step]!r}"


def test_expert_parallel_resume_is_bit_identical(workdir):
    """Experts sharded over ep (DTensors) and FSDP: the checkpoint restores them exactly."""
    out = spawn(run_resume, 2, (workdir, moe(4, **{"parallel.ep": 2, "train.steps": STEPS}), "resume_ep2"))[0]
    assert sorted(out["resumed"]) == list(range(11, STEPS + 1))
    for step, loss in out["resumed"].items():
        assert loss == out["full"][step], f"step {step}: resumed {loss!r} != {out['full'][step]!r}"


def test_resume_on_another_layout(workdir):
    """A checkpoint written by FSDP over 4 ranks resumes under tp2 x dp2 and pp2 x dp2 and the
    loss curve continues as if nothing had changed."""
    from tests.parallel.harness import run_cross_layout_resume

    out = spawn(run_cross_layout_resume, 4, (workdir,))[0]
    full = out["full"]
    assert sorted(out["to_tp"]) == list(range(6, 16)) and sorted(out["to_pp"]) == list(range(11, 16))
    for name in ("to_tp", "to_pp"):
        assert_close(name, out[name], {s: full[s] for s in out[name]})
