"""A differentiable ``all_to_all_single`` along dim 0: Ulysses (equal splits) and expert
parallelism (uneven splits) both move rows this way. Backward is the same exchange with the
splits swapped."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int] | None, in_splits: list[int] | None, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None


def _exchange(x: torch.Tensor, out_splits, in_splits, group) -> torch.Tensor:
    rows = x.shape[0] if out_splits is None else sum(out_splits)
    out = x.new_empty((rows,) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def all_to_all(x: torch.Tensor, group, out_splits: list[int] | None = None,
               in_splits: list[int] | None = None) -> torch.Tensor:
    """Send ``in_splits[i]`` rows of ``x`` to rank i of ``group`` and receive ``out_splits[i]``
    from it (equal parts when the splits are None); differentiable."""
    return _AllToAll.apply(x, out_splits, in_splits, group)
