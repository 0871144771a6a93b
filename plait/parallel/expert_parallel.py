"""Expert parallelism on the ``ep`` mesh dim: each of ep ranks holds n_experts / ep experts.

The ep ranks are data-parallel ranks (``dp_shard = edp × ep``), so each routes its own tokens.
Per MoE layer and micro-batch, after the router has sorted its (token, expert) rows by expert:

1. exchange the row counts per (destination rank, expert) — one small all-to-all;
2. send each rank the rows for its experts — ``all_to_all_single`` with uneven splits;
3. run the local experts on the received rows, regrouped by expert;
4. send the results back the same way, reversed.

Backward mirrors 2 and 4 (an all-to-all with the splits swapped). Expert weights become
DTensors sharded on dim 0 over the ep mesh, so checkpoints hold every expert once and load
on any layout; FSDP shards them further over ``edp`` (the dp_shard ranks that hold the same
experts). Their gradients sum the tokens of all ep ranks that routed to them, so they are
scaled by 1/ep before FSDP averages them over edp: the data-parallel mean, like every other
gradient.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from plait.models.moe import MoE, run_experts
from plait.parallel.all_to_all import all_to_all


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


class ExpertParallel:
    """``MoE.expert_compute`` under ep: rows go to the rank that holds their expert and back."""

    def __init__(self, group: dist.ProcessGroup):
        self.group, self.size = group, group.size()

    def __call__(self, x: torch.Tensor, counts: torch.Tensor, experts: nn.Module) -> torch.Tensor:
        per_rank = counts.numel() // self.size
        send_counts = counts.view(self.size, per_rank).contiguous()
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        in_splits = send_counts.sum(1).tolist()
        out_splits = recv_counts.sum(1).tolist()
        received = all_to_all(x, self.group, out_splits, in_splits)
        # Received rows are grouped by source rank, then by local expert; the experts want
        # them grouped by expert. ``order`` makes that regrouping and its inverse undoes it.
        blocks = torch.arange(recv_counts.numel(), device=x.device).view(self.size, per_rank)
        block_of_row = torch.repeat_interleave(blocks.reshape(-1), recv_counts.reshape(-1))
        by_expert = blocks.t().reshape(-1)  # block ids in expert-major order
        rank_in_expert_order = torch.empty_like(by_expert)
        rank_in_expert_order[by_expert] = torch.arange(by_expert.numel(), device=x.device)
        order = torch.argsort(rank_in_expert_order[block_of_row], stable=True)
        computed = experts(received[order], recv_counts.sum(0))
        restored = torch.empty_like(computed).index_copy_(0, order, computed)
        return all_to_all(restored, self.group, in_splits, out_splits)


def _sharded_experts_forward(experts: nn.Module, ep: int, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``Experts.forward`` on this rank's experts (local shards of the DTensor weights).
    An expert's gradient sums the tokens of all ep ranks, and FSDP then averages it over the
    edp (and dp_replicate) ranks only: 1/ep more makes it the data-parallel mean that every
    other gradient is."""
    w1, w2, w3 = (_ScaleGrad.apply(_local(p), 1.0 / ep) for p in (experts.w1, experts.w2, experts.w3))
    return run_experts(x, counts, w1, w2, w3)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> list[nn.Module]:
    """Keep this rank's experts of every MoE layer of ``model`` (as DTensors sharded over
    ``ep_mesh``) and route rows through ``ExpertParallel``. Returns the experts modules."""
    rank, size = ep_mesh.get_local_rank(), ep_mesh.size()
    dispatch = ExpertParallel(ep_mesh.get_group())
    wrapped = []
    for module in model.modules():
        if not isinstance(module, MoE):
            continue
        experts = module.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            local = param.detach().chunk(size, dim=0)[rank].clone()
            sharded = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            setattr(experts, name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        experts.forward = functools.partial(_sharded_experts_forward, experts, size)
        module.expert_compute = dispatch
        wrapped.append(experts)
    return wrapped
