"""Activation checkpointing: same numbers, same names, and the recomputation really happens.

On CPU in fp32 every mode reproduces the plain model's loss and gradients bit for bit (the
recomputed ops are the same kernels on the same inputs); the comparisons below use
assert_close(rtol=1e-5, atol=1e-6) so a different BLAS cannot make them flaky, and
test_bit_equal_on_cpu states the stronger property for the loss and the gradients.
"""

from __future__ import annotations

import copy
import gc
import socket
import weakref
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from plait.config import ModelConfig
from plait.models.llama import Block, KVCache, RMSNorm, build_model
from plait.parallel.recompute import (
    MODES,
    apply_activation_checkpointing,
    checkpointed_indices,
    describe,
    is_checkpointed,
    remove_activation_checkpointing,
)

CFG = ModelConfig(vocab_size=97, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)
RTOL, ATOL = 1e-5, 1e-6


def batch(packed: bool):
    ids = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    if packed:  # row 0: documents of 10 and 6 tokens; row 1: 5, 7 and 4
        pos = torch.stack([
            torch.cat([torch.arange(10), torch.arange(6)]),
            torch.cat([torch.arange(5), torch.arange(7), torch.arange(4)]),
        ])
    else:
        pos = torch.arange(16).expand(2, 16)
    return ids, pos


def loss_and_grads(model: nn.Module, ids, pos):
    logits = model(ids, pos)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[name] = g.full_tensor() if hasattr(g, "full_tensor") else g
    return loss.detach(), grads


def blocks(model: nn.Module) -> list[nn.Module]:
    return [block for _, block in model.layers.named_children()]


def count_pre_calls(modules: list[nn.Module]) -> list[Counter]:
    """Per module, a counter incremented by a forward pre-hook (fires on recomputation too;
    a post-hook would not always, since recomputation stops early)."""
    counters = [Counter() for _ in modules]
    for counter, module in zip(counters, modules):
        module.register_forward_pre_hook(lambda *_, c=counter: c.update(["calls"]))
    return counters


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def reference():
    out = {}
    for packed in (False, True):
        model = build_model(CFG, seed=0)
        out[packed] = loss_and_grads(model, *batch(packed))
    return out


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
@pytest.mark.parametrize("mode", MODES)
def test_same_loss_grads_and_names(mode, packed, reference):
    model = build_model(CFG, seed=0)
    keys = list(model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    apply_activation_checkpointing(model, mode, every=2)
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_parameters()] == names
    assert [n for n, _ in model.named_modules()] == [n for n, _ in build_model(CFG).named_modules()]
    loss, grads = loss_and_grads(model, *batch(packed))
    ref_loss, ref_grads = reference[packed]
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert g is not None, name
        torch.testing.assert_close(g, ref_grads[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", MODES)
def test_bit_equal_on_cpu(mode, reference):
    model = build_model(CFG, seed=0)
    apply_activation_checkpointing(model, mode, every=2)
    loss, grads = loss_and_grads(model, *batch(True))
    ref_loss, ref_grads = reference[True]
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(g, ref_grads[n]) for n, g in grads.items())


@pytest.mark.parametrize(
    "mode, every, recomputed",
    [("none", 2, []), ("full", 2, [0, 1, 2, 3]), ("selective", 2, [0, 2]), ("selective", 3, [0, 3]),
     ("selective", 1, [0, 1, 2, 3]), ("selective", 9, [0])],
)
def test_block_recomputation_counts(mode, every, recomputed):
    model = build_model(CFG, seed=0)
    apply_activation_checkpointing(model, mode, every=every)
    assert [i for i, b in enumerate(blocks(model)) if is_checkpointed(b)] == recomputed
    assert checkpointed_indices(mode, every, CFG.n_layers) == recomputed
    ffn = count_pre_calls([b.feed_forward for b in blocks(model)])
    attn = count_pre_calls([b.attention for b in blocks(model)])
    ids, pos = batch(True)
    logits = model(ids, pos)
    assert [c["calls"] for c in ffn] == [1] * CFG.n_layers  # forward alone runs each block once
    logits.float().pow(2).mean().backward()
    expected = [2 if i in recomputed else 1 for i in range(CFG.n_layers)]
    assert [c["calls"] for c in ffn] == expected
    assert [c["calls"] for c in attn] == expected


def _backward_ops(mode: str) -> Counter:
    model = build_model(CFG, seed=0)
    apply_activation_checkpointing(model, mode)
    loss = model(*batch(True)).float().pow(2).mean()
    with OpCount() as counter:
        loss.backward()
    return counter.ops


def test_op_mode_saves_matmuls_and_recomputes_norms():
    plain, full, op = _backward_ops("none"), _backward_ops("full"), _backward_ops("op")
    sdpa = [k for k in full if k.startswith(("_scaled_dot_product", "document_attention")) and not k.endswith("backward")]
    # Full recomputation reruns the forward matmuls and attention inside backward...
    assert full["mm"] > plain["mm"] and sdpa
    assert plain["rsqrt"] == 0 and full["rsqrt"] == 2 * CFG.n_layers
    # ...op mode replays them from the saved outputs: backward runs exactly the plain matmuls,
    assert op["mm"] == plain["mm"] and op["addmm"] == plain["addmm"] and op["bmm"] == plain["bmm"]
    assert all(op[k] == 0 for k in sdpa)
    # while both RMSNorms of every block are recomputed.
    assert op["rsqrt"] == 2 * CFG.n_layers

    model = build_model(CFG, seed=0)
    apply_activation_checkpointing(model, "op")
    norms = count_pre_calls([m for m in model.modules() if isinstance(m, RMSNorm)])
    model(*batch(True)).float().pow(2).mean().backward()
    # Block norms run twice; the final norm (outside any block) once.
    assert [c["calls"] for c in norms] == [2] * (2 * CFG.n_layers) + [1]


class LiveOutputs(TorchDispatchMode):
    """Weak references to every tensor an op produces, to measure what forward leaves alive."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.refs.append(weakref.ref(t))
        return out

    def live_bytes(self) -> int:
        storages = {}
        for ref in self.refs:
            t = ref()
            if t is not None:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values())


def test_memory_full_lt_op_lt_none():
    """Activation bytes still alive after forward (held for backward): full < op < none."""

    def held(mode: str) -> int:
        model = build_model(CFG, seed=0)
        apply_activation_checkpointing(model, mode)
        ids, pos = batch(True)
        with LiveOutputs() as live:
            logits = model(ids, pos)
        gc.collect()
        held_bytes = live.live_bytes()
        logits.sum().backward()  # and the graph still runs
        return held_bytes

    none, full, op = held("none"), held("full"), held("op")
    assert full < op < none, (full, op, none)


def test_no_recompute_without_grad_or_with_kv_cache():
    model = build_model(CFG, seed=0)
    ids, pos = batch(False)
    with torch.no_grad():
        ref = model(ids, pos)
    apply_activation_checkpointing(model, "full")
    ffn = count_pre_calls([b.feed_forward for b in blocks(model)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pos), ref, rtol=0, atol=0)
    assert [c["calls"] for c in ffn] == [1] * CFG.n_layers
    # A KV cache is written during forward: checkpointing would write it again in backward.
    cache = KVCache.empty(CFG, batch=2, max_len=32, device="cpu", dtype=torch.float32)
    out = model(ids, cache=cache)
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    assert cache.length == 16
    out.sum().backward()
    assert [c["calls"] for c in ffn] == [2] * CFG.n_layers  # no-grad forward + cached forward
    assert all(p.grad is not None for p in model.parameters())


def test_selection_by_layer_name_and_containers():
    def stage(container):
        model = nn.Module()
        model.layers = container
        return model

    # A pipeline stage keyed by global layer index picks the same layers as the whole model.
    pp = stage(nn.ModuleDict({str(i): Block(CFG) for i in range(3, 7)}))
    apply_activation_checkpointing(pp, "selective", every=2)
    assert {n: is_checkpointed(b) for n, b in pp.layers.named_children()} == {
        "3": False, "4": True, "5": False, "6": True}
    ml = stage(nn.ModuleList(Block(CFG) for _ in range(5)))
    apply_activation_checkpointing(ml, "selective", every=2)
    assert [is_checkpointed(b) for b in ml.layers] == [True, False, True, False, True]
    named = stage(nn.ModuleDict({k: Block(CFG) for k in ("a", "b", "c")}))  # falls back to position
    apply_activation_checkpointing(named, "selective", every=2)
    assert [is_checkpointed(b) for b in named.layers.values()] == [True, False, True]
    with pytest.raises(ValueError, match="layers"):
        apply_activation_checkpointing(nn.Linear(2, 2), "full")


def test_reapply_remove_and_deepcopy():
    model = build_model(CFG, seed=0)
    apply_activation_checkpointing(model, "full")
    apply_activation_checkpointing(model, "selective", every=4)
    assert [is_checkpointed(b) for b in blocks(model)] == [True, False, False, False]
    apply_activation_checkpointing(model, "none")
    assert not any(is_checkpointed(b) for b in blocks(model))
    apply_activation_checkpointing(model, "op")
    clone = copy.deepcopy(model)
    for original, copied in zip(blocks(model), blocks(clone)):
        assert copied.forward.__self__ is copied and original.forward.__self__ is original
    ffn = count_pre_calls([b.feed_forward for b in blocks(clone)])
    clone(*batch(True)).sum().backward()
    assert [c["calls"] for c in ffn] == [2] * CFG.n_layers
    assert all(p.grad is None for p in model.parameters())  # the copy ran on its own weights
    remove_activation_checkpointing(model)
    assert not any(is_checkpointed(b) or "forward" in vars(b) for b in blocks(model))


@pytest.mark.parametrize("mode, every", [("bogus", 2), ("Full", 2), ("full", 0), ("selective", -1),
                                         ("none", 0), ("op", 1.5), ("full", True)])
def test_rejects_bad_config(mode, every):
    model = build_model(CFG, seed=0)
    with pytest.raises(ValueError):
        apply_activation_checkpointing(model, mode, every)
    with pytest.raises(ValueError):
        describe(mode, every, 4)
    assert not any(is_checkpointed(b) for b in blocks(model))


def test_describe():
    assert describe("none", 2, 6) == "none: activations of all 6 blocks kept"
    assert describe("full", 2, 6) == "full: 6 of 6 blocks recomputed, only block inputs kept"
    assert describe("selective", 2, 6) == "selective (every 2): 3 of 6 blocks recomputed (0, 2, 4)"
    assert describe("selective", 4, 6) == "selective (every 4): 2 of 6 blocks recomputed (0, 4)"
    assert describe("op", 2, 6).startswith("op: 6 of 6 blocks")
    assert all("\n" not in describe(m, 2, 6) for m in MODES)


@pytest.mark.parametrize("mode", ["full", "op"])
def test_compiled_blocks(mode, reference):
    """Documented order: activation checkpointing, then compile (here without inductor)."""
    torch._dynamo.reset()
    model = build_model(CFG, seed=0)
    apply_activation_checkpointing(model, mode)
    for block in blocks(model):
        block.compile(backend="aot_eager", fullgraph=True)
    loss, grads = loss_and_grads(model, *batch(True))
    ref_loss, ref_grads = reference[True]
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
    torch._dynamo.reset()


def _tp_ac_fsdp_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from plait.parallel.tensor_parallel import apply_tensor_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp_shard", "tp"))
        ids, pos = batch(True)
        ref_loss, ref_grads = loss_and_grads(build_model(CFG, seed=0), ids, pos)
        collectives = {}
        for mode in ("none", "full", "op"):
            model = build_model(CFG, seed=0)
            keys = list(model.state_dict())
            # The documented order: TP (with sequence parallel) -> checkpointing -> FSDP2.
            apply_tensor_parallel(model, mesh["tp"], loss_parallel=False)
            apply_activation_checkpointing(model, mode)
            for block in blocks(model):
                fully_shard(block, mesh=mesh["dp_shard"])
            fully_shard(model, mesh=mesh["dp_shard"])
            assert list(model.state_dict()) == keys
            loss = F.cross_entropy(model(ids, pos)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            with OpCount() as counter:
                loss.backward()
            torch.testing.assert_close(loss.detach(), ref_loss, rtol=RTOL, atol=ATOL)
            for name, p in model.named_parameters():
                torch.testing.assert_close(p.grad.full_tensor(), ref_grads[name], rtol=RTOL, atol=ATOL,
                                           msg=lambda m: f"{mode} {name}: {m}")
            collectives[mode] = counter.ops["reduce_scatter_tensor"] + counter.ops["all_reduce"]
        # The forward reduce-scatters of the row-parallel layers: redone by full, kept by op.
        assert collectives["full"] > collectives["none"] == collectives["op"] > 0, collectives
    finally:
        dist.destroy_process_group()


def test_composes_with_tensor_parallel_and_fsdp2():
    mp = pytest.importorskip("torch.multiprocessing")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children reuse the imported torch instead of spending seconds importing it again.
    mp.start_processes(_tp_ac_fsdp_worker, args=(2, port), nprocs=2, start_method="fork")


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested_before_2026_12_06"])
def test_optimizer_state_round_trips_in_both_key_formats(tmp_path, monkeypatch, nested):
    """Param-group settings are saved keyed by parameter name (pipeline stages share group
    indices); checkpoints written keyed by group index still load, moments and settings alike."""
    import functools

    from plait.checkpoint import store
    from tests.unit.checkpoint_factory import model_and_optimizer, tiny_job, training_checkpoint

    if nested:
        monkeypatch.setattr(store, "_state_dicts", functools.partial(store._state_dicts, flat=False))
    folder = training_checkpoint(str(tmp_path / "run"), 1)
    monkeypatch.undo()
    assert store._nested_param_groups(folder) == nested
    saved, saved_opt = model_and_optimizer(tiny_job())
    model, _ = model_and_optimizer(tiny_job(), seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.3)
    store.load_checkpoint(folder, [model], optimizer)
    assert optimizer.param_groups[0]["lr"] == 1e-3 and optimizer.param_groups[0]["weight_decay"] == 0.01
    for (name, p), q in zip(model.named_parameters(), saved.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(optimizer.state[p]["exp_avg"], saved_opt.state[q]["exp_avg"]), name
