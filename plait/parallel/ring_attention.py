"""Ring attention: causal attention over a sequence whose chunks are spread over a ring of ranks.

Every rank holds queries, keys and values for some chunks of each sequence (equal-length
pieces, numbered in sequence order). Its K/V block travels once around the ring; on each hop a
rank attends its queries to the block it holds, and merges the partial result into a running
output with the log-sum-exp trick (online softmax), accumulating in fp32. While it computes,
the next block is already on its way (isend/irecv posted before the compute).

Backward recomputes each block's probabilities from the saved log-sum-exp (flash-attention
style), so only q, k, v, the output and the log-sum-exp are kept for it: activation memory per
rank is 1/ring of the whole sequence's. K/V go around the ring again, this time with their
gradient accumulators, which arrive back at their owner after the last hop.

Masking works on whole chunk pairs: a key chunk after the query chunk is skipped (no work,
no memory), one before it is fully visible, the same chunk is causal. Documents packed in one
sequence are kept apart by per-token document keys (``global index - position id``: equal
exactly for tokens of the same document), so no document needs to be a multiple of anything.

Wire bytes per layer and rank: forward (ring - 1) K/V blocks; backward (ring - 1) K/V blocks
plus ring dK/dV blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

_KV_TAG, _GRAD_TAG = 0, 1  # separate P2P streams: a prefetched K/V never matches a gradient


@dataclass(frozen=True)
class ChunkPlan:
    """Which chunks the local queries hold and which each ring rank's K/V block holds, in the
    order their tokens are laid out; ``keys``: (batch, seq) document keys in sequence order,
    or None for plain causal attention."""

    query_chunks: tuple[int, ...]
    block_chunks: tuple[tuple[int, ...], ...]  # indexed by ring rank
    keys: torch.Tensor | None


def _pair_mask(plan: ChunkPlan, q_chunk: int, k_chunk: int, length: int, device) -> torch.Tensor | None:
    """Boolean (batch or 1, 1, length, length) mask of one chunk pair, None when all visible."""
    mask = None
    if plan.keys is not None:
        kq = plan.keys[:, q_chunk * length : (q_chunk + 1) * length]
        kk = plan.keys[:, k_chunk * length : (k_chunk + 1) * length]
        mask = (kq[:, :, None] == kk[:, None, :])[:, None]
    if q_chunk == k_chunk:
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        mask = causal if mask is None else mask & causal
    return mask


def _masked_scores(q: torch.Tensor, k: torch.Tensor, plan: ChunkPlan, q_chunk: int, k_chunk: int,
                   scale: float) -> torch.Tensor:
    """Scaled scores of one query chunk against one key chunk, -inf where masked (forward and
    backward recompute the same ones)."""
    scores = q @ k.transpose(-1, -2) * scale
    mask = _pair_mask(plan, q_chunk, k_chunk, q.shape[2], q.device)
    return scores if mask is None else scores.masked_fill(~mask, float("-inf"))


def _pairs(plan: ChunkPlan, block: tuple[int, ...]):
    """(query slot, key slot, query chunk, key chunk) of every chunk pair with work to do:
    keys at or before the queries."""
    for qi, qc in enumerate(plan.query_chunks):
        for ki, kc in enumerate(block):
            if kc <= qc:
                yield qi, ki, qc, kc


def _expand(x: torch.Tensor, repeats: int) -> torch.Tensor:
    return x.repeat_interleave(repeats, dim=1) if repeats > 1 else x


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
    def forward(ctx, q, k, v, plan: ChunkPlan, group, scale: float):
        size, rank = _ring(group)
        batch, heads, tokens, dim = q.shape
        length = tokens // len(plan.query_chunks)
        repeats = heads // k.shape[1]
        acc = _accumulation_dtype(q)
        qf = q.to(acc)
        out = torch.zeros(batch, heads, tokens, dim, dtype=acc, device=q.device)
        lse = torch.full((batch, heads, tokens), float("-inf"), dtype=acc, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        for hop in range(size):
            block = plan.block_chunks[(rank - hop) % size]
            pending = _exchange(kv, group, _KV_TAG) if hop < size - 1 else None
            kb, vb = _expand(kv[0].to(acc), repeats), _expand(kv[1].to(acc), repeats)
            for qi, ki, qc, kc in _pairs(plan, block):
                qs, ks = slice(qi * length, (qi + 1) * length), slice(ki * length, (ki + 1) * length)
                scores = _masked_scores(qf[:, :, qs], kb[:, :, ks], plan, qc, kc, scale)
                block_lse = torch.logsumexp(scores, dim=-1)
                # A row with no visible key has lse -inf: its probabilities are 0, not NaN.
                probs = torch.exp(scores - _finite(block_lse)[..., None])
                block_out = probs @ vb[:, :, ks]
                new_lse = torch.logaddexp(lse[:, :, qs], block_lse)
                safe = _finite(new_lse)
                out[:, :, qs] = (out[:, :, qs] * torch.exp(lse[:, :, qs] - safe)[..., None]
                                 + block_out * torch.exp(block_lse - safe)[..., None])
                lse[:, :, qs] = new_lse
            if pending is not None:
                kv, works = pending
                _wait(works)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.group, ctx.scale = plan, group, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan, group, scale = ctx.plan, ctx.group, ctx.scale
        size, rank = _ring(group)
        batch, heads, tokens, dim = q.shape
        kv_heads = k.shape[1]
        length = tokens // len(plan.query_chunks)
        repeats = heads // kv_heads
        acc = _accumulation_dtype(q)
        qf, go = q.to(acc), grad_out.to(acc)
        delta = (go * out).sum(-1)  # rowsum(dO * O): the softmax backward's correction term
        safe_lse = _finite(lse)
        dq = torch.zeros_like(qf)
        kv = torch.stack([k, v]).contiguous()
        grads = torch.zeros((2,) + k.shape, dtype=acc, device=k.device)  # dK, dV of the held block
        for hop in range(size):
            block = plan.block_chunks[(rank - hop) % size]
            pending = _exchange(kv, group, _KV_TAG) if hop < size - 1 else None
            kb, vb = _expand(kv[0].to(acc), repeats), _expand(kv[1].to(acc), repeats)
            dk = torch.zeros_like(kb)
            dv = torch.zeros_like(vb)
            for qi, ki, qc, kc in _pairs(plan, block):
                qs, ks = slice(qi * length, (qi + 1) * length), slice(ki * length, (ki + 1) * length)
                scores = _masked_scores(qf[:, :, qs], kb[:, :, ks], plan, qc, kc, scale)
                probs = torch.exp(scores - safe_lse[:, :, qs, None])
                dv[:, :, ks] += probs.transpose(-1, -2) @ go[:, :, qs]
                dprobs = go[:, :, qs] @ vb[:, :, ks].transpose(-1, -2)
                dscores = probs * (dprobs - delta[:, :, qs, None]) * scale
                dq[:, :, qs] += dscores @ kb[:, :, ks]
                dk[:, :, ks] += dscores.transpose(-1, -2) @ qf[:, :, qs]
            grads[0] += _fold(dk, kv_heads)
            grads[1] += _fold(dv, kv_heads)
            if size > 1:
                # Pass this block's gradients on; after the last hop they reach its owner.
                grads, works = _exchange(grads, group, _GRAD_TAG)
                _wait(works)
            if pending is not None:
                kv, works = pending
                _wait(works)
        return dq.to(q.dtype), grads[0].to(k.dtype), grads[1].to(v.dtype), None, None, None


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs (scores and softmax sums need it), fp64 for fp64."""
    return torch.promote_types(x.dtype, torch.float32)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _fold(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum the gradients of repeated (GQA) K/V heads back onto the real ones."""
    batch, heads, tokens, dim = grad.shape
    if heads == kv_heads:
        return grad
    return grad.view(batch, kv_heads, heads // kv_heads, tokens, dim).sum(2)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ChunkPlan, group,
                   scale: float | None = None) -> torch.Tensor:
    """Causal attention of the local queries q (batch, heads, tokens, head_dim) over the keys
    and values k/v (batch, kv_heads, tokens, head_dim) of every rank in ``group``, laid out by
    ``plan``. Differentiable; returns (batch, heads, tokens, head_dim) in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _RingAttention.apply(q, k, v, plan, group, scale)
