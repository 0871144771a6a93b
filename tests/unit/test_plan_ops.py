"""The planner's operator counts and eager element-wise bytes, checked against plait's own Llama
(counted with a dispatch mode and the profiler), and the host-time terms they feed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from plait.config import build_config
from plait.models.llama import Llama
from plait.plan.compute import (
    DTENSOR_OPS_PER_BLOCK, DTENSOR_OPS_PER_HEAD, DTENSOR_OPS_PER_PARAM, OPS_PER_BLOCK, OPS_PER_HEAD,
    _elementwise_bytes, block_cost, optimizer_seconds, with_host,
)
from plait.plan.hardware import GPUS
from plait.layout import Layout
from plait.plan.spec import PlanModel, PlanTrain
from plait.train.loss import token_loss_sum

NOT_ELEMENTWISE = {"mm", "addmm", "bmm", "view", "_unsafe_view", "transpose", "t", "expand", "as_strided", "slice",
                   "select", "unsqueeze", "squeeze", "permute", "detach", "alias", "split", "chunk", "unbind",
                   "split_with_sizes", "empty", "empty_like", "zeros", "ones", "new_empty", "new_zeros"}


class Counter(TorchDispatchMode):
    """Operators dispatched, and bytes read and written by the element-wise ones."""

    def __init__(self):
        super().__init__()
        self.ops, self.bytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops += 1
        if name not in NOT_ELEMENTWISE and "scaled_dot_product" not in name:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


DIMS = {"model.dim": 64, "model.n_heads": 4, "model.ffn_dim": 192, "model.vocab_size": 128,
        "model.max_seq_len": 64, "train.seq_len": 64}


def _model(layers: int) -> Llama:
    torch.manual_seed(0)
    return Llama(build_config(values={**DIMS, "model.n_layers": layers}).model)


def _count_step(layers: int) -> tuple[Counter, Counter]:
    model, ids = _model(layers), torch.randint(0, 128, (2, 64))
    forward, backward = Counter(), Counter()
    with forward:
        loss = token_loss_sum(model(ids), ids)
    with backward:
        loss.backward()
    return forward, backward


def test_eager_operator_counts_and_bytes_match_plaits_block():
    (f1, b1), (f3, b3) = _count_step(1), _count_step(3)
    per_block = ((f3.ops - f1.ops) / 2, (b3.ops - b1.ops) / 2)
    assert per_block == pytest.approx(OPS_PER_BLOCK["eager"], rel=0.1)
    head = (f1.ops - per_block[0], b1.ops - per_block[1])
    assert head == pytest.approx(OPS_PER_HEAD["eager"], rel=0.25)
    # The eager element-wise bytes formula against what the block's operators move.
    model = PlanModel(n_layers=1, dim=64, n_heads=4, ffn_dim=192, vocab_size=128)
    train = PlanTrain(global_batch=2, seq_len=64, dtype="fp32", kernels="eager")
    layout = Layout(1, 1, 1, 1, 1, 1, 2, 0, "none", "1f1b")
    predicted = _elementwise_bytes(model, train, layout, rows=2 * 64, mlp_width=192)
    assert (f3.bytes - f1.bytes) / 2 == pytest.approx(predicted, rel=0.1)
    assert (b3.bytes - b1.bytes) / 2 == pytest.approx(2 * predicted, rel=0.15)
    fused = _elementwise_bytes(model, dataclasses.replace(train, kernels="fused"), layout, rows=128, mlp_width=192)
    assert fused < predicted / 2  # what fusion saves on this block


def _dtensor_events(fn) -> int:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "PythonSubclass")


def test_dtensor_operator_counts_match_plaits_tensor_parallel_plan():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    from plait.parallel.tensor_parallel import apply_tensor_parallel
    from plait.train.optim import clip_grad_norm

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        counts = {}
        for layers in (1, 3):
            model, ids, state = _model(layers), torch.randint(0, 128, (2, 64)), {}
            apply_tensor_parallel(model, mesh)

            def forward():
                with loss_parallel():
                    state["loss"] = token_loss_sum(model(ids), ids)

            def backward():
                with loss_parallel():
                    state["loss"].backward()

            optimizer = torch.optim.AdamW(model.parameters())
            step = _dtensor_events(forward) + _dtensor_events(backward)
            params = list(model.parameters())
            update = _dtensor_events(lambda: (clip_grad_norm(params, 1.0), optimizer.step()))
            counts[layers] = (step, update, len(params))
        per_block = (counts[3][0] - counts[1][0]) / 2
        assert per_block == pytest.approx(DTENSOR_OPS_PER_BLOCK, rel=0.1)
        assert counts[1][0] - per_block == pytest.approx(DTENSOR_OPS_PER_HEAD, rel=0.2)
        assert counts[3][1] / counts[3][2] == pytest.approx(DTENSOR_OPS_PER_PARAM, rel=0.15)
    finally:
        dist.destroy_process_group()


MODEL = PlanModel(n_layers=4, dim=256, n_heads=8, ffn_dim=768, vocab_size=2048)


def test_host_time_adds_on_cpus_and_hides_on_gpus():
    gpu, cpu = GPUS["h100-sxm"], GPUS["cpu"]
    assert with_host(gpu, 1.0, 0.3) == 1.0 and with_host(gpu, 0.1, 0.3) == 0.3
    assert with_host(cpu, 1.0, 0.3) == pytest.approx(1.3)
    train = PlanTrain(global_batch=4, seq_len=256, dtype="fp32", kernels="eager")
    lo = Layout(1, 1, 1, 1, 1, 1, 4, 0, "none", "1f1b")
    free = dataclasses.replace(cpu, op_overhead_s=0.0)
    busy = dataclasses.replace(cpu, op_overhead_s=1e-3)
    gap = block_cost(MODEL, train, lo, busy).forward_s - block_cost(MODEL, train, lo, free).forward_s
    assert gap == pytest.approx(OPS_PER_BLOCK["eager"][0] * 1e-3)


def test_dtensor_cost_only_for_eager_tensor_parallelism():
    cpu = dataclasses.replace(GPUS["cpu"], dtensor_op_s=1e-3)
    no_dtensor = dataclasses.replace(cpu, dtensor_op_s=0.0)
    tp2 = Layout(2, 1, 1, 1, 1, 1, 4, 0, "none", "1f1b")
    for kernels, extra in (("eager", DTENSOR_OPS_PER_BLOCK * 1e-3), ("fused", 0.0)):
        train = PlanTrain(global_batch=4, seq_len=256, dtype="fp32", kernels=kernels)
        a, b = block_cost(MODEL, train, tp2, cpu), block_cost(MODEL, train, tp2, no_dtensor)
        assert (a.forward_s + a.backward_s) - (b.forward_s + b.backward_s) == pytest.approx(extra)
        opt = optimizer_seconds(1e6, cpu, train, tensors=39, tp=2) - optimizer_seconds(1e6, no_dtensor, train, 39, 2)
        assert opt == pytest.approx(39 * DTENSOR_OPS_PER_PARAM * 1e-3 if kernels == "eager" else 0.0)
    train = PlanTrain(global_batch=4, seq_len=256, dtype="fp32", kernels="eager")
    tp1 = Layout(1, 1, 1, 1, 1, 1, 4, 0, "none", "1f1b")
    assert block_cost(MODEL, train, tp1, cpu) == block_cost(MODEL, train, tp1, no_dtensor)


def test_attention_efficiency_scales_flash_attention_only():
    cpu = GPUS["cpu"]
    slow = dataclasses.replace(cpu, attention_efficiency=cpu.attention_efficiency / 2)
    lo = Layout(1, 1, 1, 1, 1, 1, 4, 0, "none", "1f1b")
    flash = PlanTrain(global_batch=4, seq_len=256, dtype="fp32")
    assert block_cost(MODEL, flash, lo, slow).attention_core_s == pytest.approx(
        2 * block_cost(MODEL, flash, lo, cpu).attention_core_s)
    eager = dataclasses.replace(flash, attention="eager")
    assert block_cost(MODEL, eager, lo, slow).attention_core_s == block_cost(MODEL, eager, lo, cpu).attention_core_s
