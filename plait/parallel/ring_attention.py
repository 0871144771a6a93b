"""Ring attention: causal attention over a sequence whose chunks are spread over a ring of ranks.

Every rank holds queries, keys and values for some chunks of each sequence (equal-length
pieces, numbered in sequence order). Its K/V block travels once around the ring; on each hop a
rank attends its queries to the block it holds, and merges the partial result into a running
output with the log-sum-exp trick (online softmax), accumulating in fp32. While it computes,
the next block is already on its way (isend/irecv posted before the compute).

Each (query chunk, key chunk) pair is computed by the block kernels of
plait/models/attention.py (the fused kernel that returns the log-sum-exp, or the explicit
reference math), which return the block's output and log-sum-exp; backward gives each block the
merged output and log-sum-exp (flash-attention style), so only q, k, v, the output and the
log-sum-exp are kept for it: activation memory per rank is 1/ring of the whole sequence's. K/V
go around the ring again, this time with their gradient accumulators, which arrive back at
their owner after the last hop.

Masking works on whole chunk pairs: a key chunk after the query chunk is skipped (no work,
no memory), one before it is fully visible, the same chunk is causal. Documents packed in one
sequence are kept apart by per-token document keys (``global index - position id``: equal
exactly for tokens of the same document): a pair is cut into one rectangle per document the
two chunks share, so no document needs to be a multiple of anything.

Wire bytes per layer and rank: forward (ring - 1) K/V blocks; backward (ring - 1) K/V blocks
plus ring dK/dV blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from plait.models.attention import Rect, accumulation_dtype, block_kernels, finite, rects, same_dtype

_KV_TAG, _GRAD_TAG = 0, 1  # separate P2P streams: a prefetched K/V never matches a gradient


@dataclass(frozen=True)
class ChunkPlan:
    """Which chunks the local queries hold and which each ring rank's K/V block holds, in the
    order their tokens are laid out; ``keys``: (batch, seq) document keys in sequence order,
    or None for plain causal attention."""

    query_chunks: tuple[int, ...]
    block_chunks: tuple[tuple[int, ...], ...]  # indexed by ring rank
    keys: torch.Tensor | None


def _work(plan: ChunkPlan, q_chunk: int, k_chunk: int, length: int) -> list[Rect]:
    """The rectangles of one chunk pair (keys at or before the queries)."""
    if plan.keys is None:
        return rects(None, None, q_chunk == k_chunk, length, length)
    kq = plan.keys[:, q_chunk * length : (q_chunk + 1) * length]
    kk = plan.keys[:, k_chunk * length : (k_chunk + 1) * length]
    return rects(kq, kk, q_chunk == k_chunk, length, length)


def _pairs(plan: ChunkPlan, block: tuple[int, ...]):
    """(query slot, key slot, query chunk, key chunk) of every chunk pair with work to do:
    keys at or before the queries."""
    for qi, qc in enumerate(plan.query_chunks):
        for ki, kc in enumerate(block):
            if kc <= qc:
                yield qi, ki, qc, kc


def _ring(group) -> tuple[int, int]:
    """(size, rank) of the ring; a missing group is a ring of one (no communication)."""
    return (1, 0) if group is None else (group.size(), group.rank())


def _exchange(send: torch.Tensor, group, tag: int) -> tuple[torch.Tensor, list]:
    """Post: send ``send`` to the next ring rank, receive the same shape from the previous."""
    size, rank = _ring(group)
    recv = torch.empty_like(send)
    works = [
        dist.isend(send, group=group, group_dst=(rank + 1) % size, tag=tag),
        dist.irecv(recv, group=group, group_src=(rank - 1) % size, tag=tag),
    ]
    return recv, works


def _wait(works: list) -> None:
    for work in works:
        work.wait()


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: ChunkPlan, group, scale: float, kernel: str):
        size, rank = _ring(group)
        length = q.shape[2] // len(plan.query_chunks)
        block_forward, _ = block_kernels(q.device, kernel)
        acc = accumulation_dtype(q)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        for hop in range(size):
            block = plan.block_chunks[(rank - hop) % size]
            pending = _exchange(kv, group, _KV_TAG) if hop < size - 1 else None
            for qi, ki, qc, kc in _pairs(plan, block):
                qs, ks = slice(qi * length, (qi + 1) * length), slice(ki * length, (ki + 1) * length)
                block_out, block_lse = block_forward(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks],
                                                     _work(plan, qc, kc, length), scale)
                # Online softmax: merge the block into the running output, in fp32.
                new_lse = torch.logaddexp(lse[:, :, qs], block_lse)
                safe = finite(new_lse)
                out[:, :, qs] = (out[:, :, qs] * torch.exp(lse[:, :, qs] - safe)[..., None]
                                 + block_out * torch.exp(block_lse - safe)[..., None])
                lse[:, :, qs] = new_lse
            if pending is not None:
                kv, works = pending
                _wait(works)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.group, ctx.scale, ctx.kernel = plan, group, scale, kernel
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan, group, scale = ctx.plan, ctx.group, ctx.scale
        size, rank = _ring(group)
        length = q.shape[2] // len(plan.query_chunks)
        _, block_backward = block_kernels(q.device, ctx.kernel)
        acc = accumulation_dtype(q)
        grad_out = grad_out.contiguous()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        grads = torch.zeros((2,) + k.shape, dtype=acc, device=k.device)  # dK, dV of the held block
        for hop in range(size):
            block = plan.block_chunks[(rank - hop) % size]
            pending = _exchange(kv, group, _KV_TAG) if hop < size - 1 else None
            for qi, ki, qc, kc in _pairs(plan, block):
                qs, ks = slice(qi * length, (qi + 1) * length), slice(ki * length, (ki + 1) * length)
                block_backward(grad_out[:, :, qs], q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], out[:, :, qs],
                               lse[:, :, qs], _work(plan, qc, kc, length), scale,
                               (dq[:, :, qs], grads[0][:, :, ks], grads[1][:, :, ks]))
            if size > 1:
                # Pass this block's gradients on; after the last hop they reach its owner.
                grads, works = _exchange(grads, group, _GRAD_TAG)
                _wait(works)
            if pending is not None:
                kv, works = pending
                _wait(works)
        return dq.to(q.dtype), grads[0].to(k.dtype), grads[1].to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ChunkPlan, group,
                   scale: float | None = None, kernel: str = "auto") -> torch.Tensor:
    """Causal attention of the local queries q (batch, heads, tokens, head_dim) over the keys
    and values k/v (batch, kv_heads, tokens, head_dim) of every rank in ``group``, laid out by
    ``plan``. Differentiable; returns (batch, heads, tokens, head_dim) in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = same_dtype(q, k, v)
    return _RingAttention.apply(q, k, v, plan, group, scale, kernel)
