"""The planner's [memory] options: host figures, offload and activation-offload bytes and copies,
token-wise recompute, the search's use of them, and predicted_memory against plait's own model."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace

import pytest
import torch

from plait.config import build_config
from plait.errors import ConfigError
from plait.layout import Layout, parse_layout
from plait.plan.compute import BlockCost, block_cost
from plait.plan.estimate import estimate
from plait.plan.hardware import GIB, GIGA, GPUS, Cluster
from plait.plan.job import job_layout, predicted_memory
from plait.plan.memory import (
    HostMemory, Memory, block_activations, bucket_bytes, fits, memory_per_gpu, model_state_bytes, offloaded_blocks,
    stage_params,
)
from plait.plan.offload import (
    HOST_ADAMW_STATE_BYTES, activation_offload_seconds, host_adamw_seconds, params_offload_seconds,
)
from plait.plan.search import memory_problem, search
from plait.plan.spec import PlanCluster, PlanModel, PlanTrain, build_cluster


def layout(**kw) -> Layout:
    base = dict(tp=1, pp=1, vpp=1, dp=8, cp=1, ep=1, micro_batch=1, zero=0, recompute="none", schedule="1f1b")
    return Layout(**{**base, **kw})


def llama(**kw) -> PlanModel:
    base = dict(n_layers=32, dim=4096, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256)
    return PlanModel(**{**base, **kw})


TRAIN = PlanTrain(global_batch=64, seq_len=4096)
H100 = GPUS["h100-sxm"]


# hardware ---------------------------------------------------------------------------------------

def test_catalog_host_link_and_memory_per_gpu():
    assert GPUS["a100-80gb"].host_link_bytes_per_s == 25 * GIGA  # PCIe Gen4 x16
    assert H100.host_link_bytes_per_s == GPUS["h200"].host_link_bytes_per_s == 50 * GIGA  # Gen5
    assert GPUS["b200"].host_link_bytes_per_s == 50 * GIGA
    assert GPUS["cpu"].host_link_bytes_per_s == 5 * GIGA and GPUS["cpu"].unified_memory
    assert H100.host_memory_bytes == 2000 * GIGA / 8  # a 2 TB node of 8 GPUs


def test_fits_checks_host_memory_and_one_pool_on_a_cpu():
    small = Memory(1.0, 0, 0, 0, 0, 0, host=HostMemory(optimizer=H100.host_memory_bytes + 1))
    assert not fits(small, H100)
    cpu = GPUS["cpu"]
    half = Memory(0.6 * cpu.memory_bytes, 0, 0, 0, 0, 0, host=HostMemory(optimizer=0.6 * cpu.memory_bytes))
    assert not fits(half, cpu) and fits(half, replace(cpu, unified_memory=False))


# memory -----------------------------------------------------------------------------------------

def test_optimizer_offload_moves_the_optimizer_state_to_the_host():
    model = llama()
    plain = memory_per_gpu(model, TRAIN, layout(zero=1), H100)
    off = memory_per_gpu(model, TRAIN, layout(zero=1, offload="optimizer"), H100)
    assert off.optimizer == 0 and off.host.optimizer == pytest.approx(plain.optimizer)
    assert (off.params, off.grads) == (plain.params, plain.grads)
    assert off.host.grads == pytest.approx(plain.grads / 8)  # the shard this rank updates
    assert off.total == pytest.approx(plain.total - plain.optimizer)


def test_params_offload_keeps_two_gathered_blocks_and_their_gradients():
    model = llama()
    lo = layout(zero=3, offload="params")
    mem = memory_per_gpu(model, TRAIN, lo, H100)
    shared, experts = stage_params(model, lo, True, True)
    assert (mem.host.params, mem.host.grads, mem.host.optimizer) == pytest.approx(
        model_state_bytes(shared, experts, replace(lo, zero=3), "bf16"))
    block = 2 * model.shared_block_params()
    root = 2 * (2 * model.embedding_params() + model.dim)  # embedding, output layer, final norm
    assert mem.params == pytest.approx(2 * block + root)
    assert mem.grads == pytest.approx(2 * block) and mem.optimizer == 0
    zero2 = memory_per_gpu(model, TRAIN, replace(lo, zero=2), H100)  # ZeRO-2 keeps every block gathered
    assert zero2.params == pytest.approx(32 * block + root)


def test_activation_offload_keeps_two_blocks_on_the_device():
    model, lo = llama(), layout(zero=3)
    kept = block_activations(model, TRAIN, lo).kept("none")
    plain = memory_per_gpu(model, TRAIN, lo, H100)
    off = memory_per_gpu(model, TRAIN, replace(lo, activation_offload=31), H100)
    assert off.host.activations == pytest.approx(31 * kept)
    assert plain.activations - off.activations == pytest.approx(31 * kept)
    assert off.transient - plain.transient == pytest.approx(2 * kept)


def test_offloaded_blocks_per_pipeline_rank():
    lo = layout(pp=4, dp=2, activation_offload=31)  # 32 layers, 8 per stage
    assert offloaded_blocks(lo, 32, first=True) == 8 and offloaded_blocks(lo, 32, first=False) == 7
    interleaved = replace(lo, vpp=2, schedule="interleaved_1f1b", activation_offload=20)  # chunks of 4
    assert offloaded_blocks(interleaved, 32, first=True) == 8  # chunks 0 and 4: layers 0-3 and 16-19
    assert offloaded_blocks(interleaved, 32, first=False) == 4  # chunks 3 and 7: layers 12-15, 28-31
    v_shape = replace(lo, vpp=2, schedule="zbv", activation_offload=4)  # rank 0: chunks 0 and 7
    assert offloaded_blocks(v_shape, 32, first=True) == 4
    assert offloaded_blocks(replace(lo, activation_offload=-1), 32, first=False) == 8


def test_recompute_fraction_keeps_the_core_and_the_region_inputs():
    model, lo = llama(), layout()
    parts = block_activations(model, TRAIN, lo)
    assert parts.kept("none", 1.0) == pytest.approx(parts.core + parts.block_input)
    half = parts.kept("none", 0.5)
    assert half == pytest.approx((parts.kept("none") + parts.kept("none", 1.0)) / 2)
    assert parts.rebuilt("none", 0.5) == pytest.approx(0.5 * (parts.region_a + parts.region_b))
    mem = memory_per_gpu(model, TRAIN, replace(lo, recompute_fraction=0.5), H100)
    assert mem.transient == pytest.approx(parts.rebuilt("none", 0.5) + bucket_bytes(lo))


# time -------------------------------------------------------------------------------------------

def test_recompute_fraction_reruns_its_share_of_the_per_token_forward():
    block = block_cost(llama(), TRAIN, layout(), H100)
    extra = block.with_recompute("none", 0.25) - block.with_recompute("none")
    assert extra == pytest.approx(0.25 * (block.forward_s - block.attention_core_s))


def test_optimizer_offload_copies_and_host_adamw_are_exposed():
    model, cluster = llama(), build_cluster(PlanCluster(gpu="h100-sxm", gpus=8))
    plain = estimate(model, TRAIN, cluster, layout(zero=1))
    off = estimate(model, TRAIN, cluster, layout(zero=1, offload="optimizer"))
    shared, _ = stage_params(model, layout(), True, True)
    local = shared / 8
    assert off.exposed_comm_s["host"] == pytest.approx(2 * 2 * local / H100.host_link_bytes_per_s)
    assert off.optimizer_s == pytest.approx(local * (HOST_ADAMW_STATE_BYTES + 4) / H100.host_memory_bytes_per_s)
    assert host_adamw_seconds(H100, local, "bf16") == pytest.approx(off.optimizer_s)
    assert off.step_time_s > plain.step_time_s


def test_params_offload_hides_copies_behind_one_block_only():
    model, lo = llama(), layout(zero=3, offload="params")
    shared, _ = stage_params(model, lo, True, True)
    unit_s = 2 * model.shared_block_params() / 8 / H100.host_link_bytes_per_s
    root_s = 2 * (shared - 32 * model.shared_block_params()) / 8 / H100.host_link_bytes_per_s
    slow = BlockCost(forward_s=1.0, backward_s=2.0, attention_core_s=0.1)
    assert params_offload_seconds(model, TRAIN, lo, H100, slow, shared, 32) == pytest.approx(3 * root_s)
    fast = BlockCost(forward_s=0.0, backward_s=0.0, attention_core_s=0.0)
    assert params_offload_seconds(model, TRAIN, lo, H100, fast, shared, 32) == pytest.approx(3 * root_s + 96 * unit_s)


def test_activation_offload_exposes_what_the_block_cannot_hide():
    lo, kept = layout(activation_offload=3), 10 * GIGA
    copy_s = kept / H100.host_link_bytes_per_s  # 0.2 s
    block = BlockCost(forward_s=0.1, backward_s=0.3, attention_core_s=0.0)
    assert activation_offload_seconds(H100, block, lo, kept, 3) == pytest.approx(3 * (copy_s - 0.1))
    cpu = GPUS["cpu"]  # a memcpy on the computing thread: nothing overlaps
    assert activation_offload_seconds(cpu, block, lo, kept, 3) == pytest.approx(6 * kept / cpu.host_link_bytes_per_s)


# search -----------------------------------------------------------------------------------------

def test_memory_options_respect_the_trainers_limits():
    model = llama()
    assert "activation_checkpointing" in memory_problem(model, TRAIN, layout(recompute="full", recompute_fraction=0.5))
    assert "parallel.tp = 1" in memory_problem(model, TRAIN, layout(tp=2, dp=4, zero=3, recompute_fraction=0.5))
    assert "a dense model" in memory_problem(llama(moe_experts=8), TRAIN, layout(recompute_fraction=0.5))
    assert "zero = 2 or 3" in memory_problem(model, TRAIN, layout(zero=1, offload="params"))
    assert "compile" in memory_problem(model, replace(TRAIN, compile=True), layout(activation_offload=-1))
    assert memory_problem(model, TRAIN, layout(zero=2, offload="params", activation_offload=31)) is None


def test_a_model_too_big_without_them_fits_with_memory_options():
    model = llama(n_layers=80, dim=8192, n_heads=64, ffn_dim=28672)  # 70B: 1.1 TB of state for 640 GB
    cluster = build_cluster(PlanCluster(gpu="h100-sxm", gpus=8))
    fixed = {"tp": 8, "pp": 1}
    none = {"offload": "none", "activation_offload": 0, "recompute_fraction": 0.0}
    assert not search(model, TRAIN, cluster, {**fixed, **none}).ranked
    best = search(model, TRAIN, cluster, fixed).ranked[0]
    assert best.fits and best.layout.offload != "none" and best.memory.host.total > 0


def test_memory_options_only_rescue_layouts_that_do_not_fit():
    model, cluster = llama(n_layers=16, dim=2048, n_heads=16), build_cluster(PlanCluster(gpu="a100-40gb", gpus=8))
    result = search(model, replace(TRAIN, global_batch=32), cluster, {"pp": 1, "cp": 1})
    assert not result.ranked[0].layout.memory_options
    rescued = [e for e in result.ranked if e.layout.memory_options]
    assert rescued
    for est in rescued:
        plain = replace(est.layout, offload="none", activation_offload=0, recompute_fraction=0.0)
        assert not fits(memory_per_gpu(model, replace(TRAIN, global_batch=32), plain, cluster.gpu), cluster.gpu)


def test_layout_text_carries_memory_options():
    lo = layout(zero=3, offload="params", activation_offload=31, recompute_fraction=0.25)
    fixed = parse_layout(lo.text())
    assert (fixed["offload"], fixed["activation_offload"], fixed["recompute_fraction"]) == ("params", 31, 0.25)
    assert "offload" not in layout().text()
    with pytest.raises(ConfigError, match="recompute_fraction"):
        parse_layout("recompute_fraction=2")


def test_cli_json_shows_memory_options():
    from plait.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["plan", "--model.n_layers", "80", "--model.dim", "8192", "--model.n_heads", "64",
                     "--model.n_kv_heads", "8", "--model.ffn_dim", "28672", "--model.vocab_size", "128256",
                     "--cluster.gpu", "h100-sxm", "--cluster.gpus", "8", "--train.global_batch", "16",
                     "--train.seq_len", "4096", "--layout", "tp=8,pp=1", "--json", "--top", "2"])
    [first, _] = json.loads(out.getvalue())["layouts"]
    assert code == 0 and first["offload"] in ("optimizer", "params") and first["host_memory_gib_per_gpu"] > 0
    assert {"activation_offload", "recompute_fraction"} <= set(first)
    assert set(first["breakdown"]["host_memory_gib"]) == {"params", "grads", "optimizer", "activations"}


# parallel.layout = "auto" -----------------------------------------------------------------------

def test_auto_writes_memory_options_and_keeps_an_auto_micro_batch():
    from plait.plan.auto import plan_inputs, with_layout

    cfg = build_config(values={"parallel.layout": "auto", "parallel.nproc": 4, "model.vocab_size": 512,
                               "train.global_batch": 16, "train.device": "cpu", "train.micro_batch": "auto"})
    model, train, cluster_spec = plan_inputs(cfg, 4)
    cluster = build_cluster(cluster_spec)
    est = estimate(model, train, cluster, layout(dp=4, micro_batch=2, zero=3, offload="params", activation_offload=1,
                                                 recompute_fraction=0.5))
    chosen = with_layout(cfg, est)
    assert chosen.train.micro_batch == "auto"
    assert (chosen.memory.offload, chosen.memory.activation_offload, chosen.memory.recompute_fraction) == (
        "params", 1, 0.5)
    manual = with_layout(build_config(values={"parallel.nproc": 4, "train.global_batch": 16}), est)
    assert manual.train.micro_batch == 2


# predicted_memory -------------------------------------------------------------------------------

def _job(**values):
    base = {"model.dim": 256, "model.n_layers": 4, "model.n_heads": 8, "model.n_kv_heads": 4, "model.ffn_dim": 768,
            "model.vocab_size": 512, "train.seq_len": 512, "train.micro_batch": 4, "train.global_batch": 4,
            "train.dtype": "fp32", "train.device": "cpu", "parallel.nproc": 1}
    return build_config(values={**base, **values})


def _saved_bytes(cfg) -> int:
    """Bytes of the distinct storages plait's Llama saves for backward in one forward, its
    parameters' excluded."""
    from plait.models.llama import Llama
    from plait.parallel.recompute import apply_activation_checkpointing

    torch.manual_seed(0)
    model = Llama(cfg.model)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage)  # the reference keeps the storage alive
        return t

    ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.train.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids)
    return sum(s.nbytes() for s in seen.values())


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_predicted_activations_match_plaits_saved_tensors(checkpointing):
    cfg = _job(**{"train.activation_checkpointing": checkpointing})
    predicted = predicted_memory(cfg, 1)["device"]["activations"]
    assert predicted == pytest.approx(_saved_bytes(cfg), rel=0.10)


def _retained_bytes(cfg) -> int:
    """Bytes of storage a forward of plait's Llama leaves alive besides its logits: what backward
    will use, measured with the device-memory tracker (op recompute keeps its saved outputs in
    the checkpoint's own cache, out of reach of saved-tensor hooks)."""
    from plait.models.llama import Llama
    from plait.parallel.recompute import apply_activation_checkpointing
    from plait.telemetry.device_memory import DeviceMemory

    torch.manual_seed(0)
    model = Llama(cfg.model)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.train.seq_len))
    tracker = DeviceMemory()
    tracker.add(*model.parameters(), *model.buffers(), ids)
    before = tracker.live
    with tracker:
        logits = model(ids)
    return tracker.live - before - logits.untyped_storage().nbytes()


@pytest.mark.parametrize("checkpointing", ["none", "op"])
def test_predicted_op_recompute_activations_match_what_plait_keeps(checkpointing):
    """Op recompute keeps the matmul and attention outputs; the prediction matches what plait's
    Llama keeps alive after forward (the same measurement of no recompute matches too)."""
    cfg = _job(**{"train.activation_checkpointing": checkpointing})
    predicted = predicted_memory(cfg, 1)["device"]["activations"]
    assert predicted == pytest.approx(_retained_bytes(cfg), rel=0.10)


def test_predicted_memory_splits_device_and_host():
    plain = predicted_memory(_job(), 1)
    params = sum(p.numel() for p in __import__("plait.models.llama", fromlist=["Llama"]).Llama(_job().model).parameters())
    assert plain["device"]["params"] == plain["device"]["grads"] == 4 * params
    assert plain["device"]["optimizer"] == 8 * params and plain["host"]["optimizer"] == 0
    off = predicted_memory(_job(**{"memory.offload": "optimizer", "memory.activation_offload": -1}), 1)
    assert off["device"]["optimizer"] == 0 and off["host"]["optimizer"] == 8 * params
    assert off["host"]["activations"] > 0 and off["device"]["activations"] < plain["device"]["activations"]
    bf16 = predicted_memory(_job(**{"train.dtype": "bf16"}), 1)
    assert bf16["device"]["params"] == 4 * params  # plait keeps fp32 weights under autocast
    with pytest.raises(ConfigError, match="micro_batch"):
        job_layout(_job(**{"train.micro_batch": "auto"}), 1)
