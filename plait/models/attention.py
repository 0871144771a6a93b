"""Attention kernels: the one place that decides how q, k and v become an output.

The model, context parallelism (ring and Ulysses) and generation all call this file, and
``model.attention_kernel`` picks the path:

- ``fused`` (what ``auto`` picks): packed documents cost their own attention. A row holding
  several documents is attended document by document with the fused causal SDPA kernel
  (FLOPs in proportion to Σ sᵢ², never an s × s mask). Ring attention computes each block
  pair with the fused kernel that also returns the log-sum-exp
  (``_scaled_dot_product_flash_attention_for_cpu`` and its backward, given the merged output
  and log-sum-exp), one rectangle per document the two chunks share.
- ``reference``: the dense path plait had before, kept as the reference the fused one is
  tested and benchmarked against: one boolean (batch, 1, s, s) document mask for SDPA, and
  ring blocks as explicit fp32 matmuls, ``logsumexp`` and ``masked_fill``.

Documents are described by *keys*: per token, its global index minus its position id, equal
exactly for the tokens of one document (positions restart at 0 at every document start). A
document is a run of equal keys, so no document needs to be a multiple of anything.

The ring's fused blocks call a CPU kernel: on other devices ``auto`` keeps the ring on the
reference math, since the CUDA kernels with a log-sum-exp could not be run where plait was
tested. Per-document SDPA is the same code on every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

@dataclass(frozen=True)
class Rect:
    """One block of attention work: queries [q0, q1) of batch row ``row`` (None: every row)
    over keys [k0, k1), all visible, or causally (query i sees keys up to k0 + i - q0)."""

    row: int | None
    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool


def document_keys(position_ids: torch.Tensor) -> torch.Tensor | None:
    """(batch, seq) document keys, or None when every row is one document (plain causal)."""
    if not bool((position_ids[:, 1:] == 0).any()):
        return None
    seq = position_ids.shape[-1]
    return torch.arange(seq, device=position_ids.device) - position_ids


def _runs(keys: torch.Tensor) -> list[tuple[int, int, int]]:
    """(key, start, stop) of each run of equal values in a 1-D tensor."""
    values, counts = torch.unique_consecutive(keys, return_counts=True)
    runs, start = [], 0
    for value, count in zip(values.tolist(), counts.tolist()):
        runs.append((value, start, start + count))
        start += count
    return runs


def rects(q_keys: torch.Tensor | None, k_keys: torch.Tensor | None, same_chunk: bool, q_len: int,
          k_len: int) -> list[Rect]:
    """The work of one (query chunk, key chunk) pair with the keys at or before the queries:
    the whole pair (causal on the diagonal) without documents, else one rectangle per document
    the two chunks share, in each batch row."""
    if q_keys is None:
        return [Rect(None, 0, q_len, 0, k_len, same_chunk)]
    out = []
    for row in range(q_keys.shape[0]):
        key_runs = {key: (start, stop) for key, start, stop in _runs(k_keys[row])}
        for key, q0, q1 in _runs(q_keys[row]):
            if key in key_runs:
                k0, k1 = key_runs[key]
                out.append(Rect(row, q0, q1, k0, k1, same_chunk))
    return out


def _place(rect: Rect) -> slice:
    """The batch rows a rectangle covers."""
    return slice(None) if rect.row is None else slice(rect.row, rect.row + 1)


def _rows(x: torch.Tensor, rect: Rect, keys: bool) -> torch.Tensor:
    """The rectangle's queries (or, with ``keys``, its keys) of q, k, v or an output."""
    lo, hi = (rect.k0, rect.k1) if keys else (rect.q0, rect.q1)
    return x[_place(rect), :, lo:hi]


# ---- whole-sequence attention (one process, Ulysses after its all-to-all, generation)


def _expand(x: torch.Tensor, repeats: int) -> torch.Tensor:
    return x.repeat_interleave(repeats, dim=1) if repeats > 1 else x


def dense_mask(keys: torch.Tensor) -> torch.Tensor:
    """Boolean (batch, 1, seq, seq) causal mask within documents: the reference path."""
    seq = keys.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=keys.device).tril()
    return ((keys[:, :, None] == keys[:, None, :]) & causal)[:, None]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor | None,
                     kernel: str = "auto") -> torch.Tensor:
    """Causal attention of q (batch, heads, seq, head_dim) over k/v (batch, kv_heads, seq,
    head_dim), kv_heads dividing heads (GQA), within the documents of ``keys``
    (:func:`document_keys`; None: one document per row)."""
    if keys is None or kernel == "reference":
        repeats = q.shape[1] // k.shape[1]
        k, v = _expand(k, repeats), _expand(v, repeats)
        mask = None if keys is None else dense_mask(keys)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=keys is None)
    q, k, v = same_dtype(q, k, v)
    out, _ = document_attention(q, k, v, keys, q.shape[-1] ** -0.5, fused_blocks(q.device, kernel))
    return out


def same_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v in one dtype, as SDPA would take them: autocast's under autocast (RoPE leaves q
    and k in fp32 beside a bf16 v), else the promoted one. Custom operators and autograd
    Functions are not autocast, and the fused kernels want one dtype."""
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in tensors)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Generation: queries at absolute positions start.. over every cached key up to each."""
    repeats = q.shape[1] // k.shape[1]
    k, v = _expand(k, repeats), _expand(v, repeats)
    seq = q.shape[2]
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # Query i sits at absolute position start+i and sees keys up to it: all of them when it
    # is the only query.
    key_pos = torch.arange(start + seq, device=q.device)
    query_pos = torch.arange(start, start + seq, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_pos[None, :] <= query_pos[:, None])


# ---- blocks with a log-sum-exp (ring attention)
#
# A block is one (query chunk, key chunk) pair; ``work`` its rectangles (:func:`rects`).
# ``*_forward`` returns the block's output and log-sum-exp, in the accumulation dtype (fp32,
# fp64 for fp64 inputs); ``*_backward`` adds the block's share to fp32/fp64 dq, dk, dv given the
# merged output and log-sum-exp of every block, as flash attention's backward does block by
# block. Rows no rectangle covers get output 0 and lse -inf.


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs (scores and softmax sums need it), fp64 for fp64."""
    return torch.promote_types(x.dtype, torch.float32)


def finite(lse: torch.Tensor) -> torch.Tensor:
    """-inf (a row with no visible key) as 0, so exp(x - lse) is 0 there, not NaN."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def fused_blocks(device: torch.device, kernel: str) -> bool:
    """Whether ring blocks use the fused kernel: ``fused``, or ``auto`` on the CPU."""
    return kernel == "fused" or (kernel == "auto" and device.type == "cpu")


def _empty_block(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(q)
    batch, heads, q_len, dim = q.shape
    return (torch.zeros(batch, heads, q_len, dim, dtype=acc, device=q.device),
            torch.full((batch, heads, q_len), float("-inf"), dtype=acc, device=q.device))


def fused_block_forward(q, k, v, work: list[Rect], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _empty_block(q)
    for rect in work:
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _rows(q, rect, False), _rows(k, rect, True), _rows(v, rect, True), 0.0, rect.causal, scale=scale)
        out[_place(rect), :, rect.q0 : rect.q1] = o
        lse[_place(rect), :, rect.q0 : rect.q1] = l
    return out, lse


def fused_block_backward(grad_out, q, k, v, out, lse, work: list[Rect], scale: float, grads) -> None:
    dq, dk, dv = grads
    for rect in work:
        rows = _place(rect)
        pieces = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _rows(grad_out, rect, False), _rows(q, rect, False), _rows(k, rect, True), _rows(v, rect, True),
            _rows(out, rect, False), lse[rows, :, rect.q0 : rect.q1], 0.0, rect.causal, scale=scale)
        dq[rows, :, rect.q0 : rect.q1] += pieces[0]
        dk[rows, :, rect.k0 : rect.k1] += pieces[1]
        dv[rows, :, rect.k0 : rect.k1] += pieces[2]


def _rect_mask(work: list[Rect], batch: int, q_len: int, k_len: int, device) -> torch.Tensor:
    """Boolean (batch, 1, q_len, k_len): what the rectangles let each query see."""
    mask = torch.zeros(batch, 1, q_len, k_len, dtype=torch.bool, device=device)
    for rect in work:
        block = torch.ones(rect.q1 - rect.q0, rect.k1 - rect.k0, dtype=torch.bool, device=device)
        mask[_place(rect), :, rect.q0 : rect.q1, rect.k0 : rect.k1] = block.tril() if rect.causal else block
    return mask


def _fold(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum the gradients of repeated (GQA) K/V heads back onto the real ones."""
    batch, heads, tokens, dim = grad.shape
    if heads == kv_heads:
        return grad
    return grad.view(batch, kv_heads, heads // kv_heads, tokens, dim).sum(2)


def _reference_scores(q, k, work, scale):
    acc = accumulation_dtype(q)
    kb = _expand(k.to(acc), q.shape[1] // k.shape[1])
    scores = q.to(acc) @ kb.transpose(-1, -2) * scale
    mask = _rect_mask(work, q.shape[0], q.shape[2], k.shape[2], q.device)
    return scores.masked_fill(~mask, float("-inf"))


def reference_block_forward(q, k, v, work: list[Rect], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not work:
        return _empty_block(q)
    scores = _reference_scores(q, k, work, scale)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - finite(lse)[..., None])
    return probs @ _expand(v.to(scores.dtype), q.shape[1] // v.shape[1]), lse


def reference_block_backward(grad_out, q, k, v, out, lse, work: list[Rect], scale: float, grads) -> None:
    if not work:
        return
    dq, dk, dv = grads
    acc, repeats = accumulation_dtype(q), q.shape[1] // k.shape[1]
    go, qf = grad_out.to(acc), q.to(acc)
    kb, vb = _expand(k.to(acc), repeats), _expand(v.to(acc), repeats)
    probs = torch.exp(_reference_scores(q, k, work, scale) - finite(lse)[..., None])
    delta = (go * out.to(acc)).sum(-1)  # rowsum(dO * O): the softmax backward's correction term
    dscores = probs * (go @ vb.transpose(-1, -2) - delta[..., None]) * scale
    dq += dscores @ kb
    dk += _fold(dscores.transpose(-1, -2) @ qf, k.shape[1])
    dv += _fold(probs.transpose(-1, -2) @ go, k.shape[1])


def block_kernels(device: torch.device, kernel: str):
    """(forward, backward) of ring blocks for ``model.attention_kernel`` on ``device``."""
    if fused_blocks(device, kernel):
        return fused_block_forward, fused_block_backward
    return reference_block_forward, reference_block_backward


# ---- packed documents as one opaque operator
#
# The documents' lengths are data: traced into a compiled block they would be guarded on and
# recompile the block for every batch. As a custom operator the whole loop over documents is
# one node of the graph (shapes known from q), with its own backward.


@torch.library.custom_op("plait::document_attention", mutates_args=())
def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, scale: float,
                       fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention within each document of ``keys``: (output in q's dtype, log-sum-exp)."""
    forward = fused_block_forward if fused else reference_block_forward
    out, lse = forward(q, k, v, rects(keys, keys, True, q.shape[2], k.shape[2]), scale)
    return out.to(q.dtype), lse


@document_attention.register_fake
def _(q, k, v, keys, scale, fused):
    # Contiguous, as the real outputs are (empty_like would copy q's transposed strides).
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=accumulation_dtype(q))


@torch.library.custom_op("plait::document_attention_backward", mutates_args=())
def document_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                out: torch.Tensor, lse: torch.Tensor, keys: torch.Tensor, scale: float,
                                fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(q)
    grads = (torch.zeros(q.shape, dtype=acc, device=q.device), torch.zeros(k.shape, dtype=acc, device=k.device),
             torch.zeros(v.shape, dtype=acc, device=v.device))
    backward = fused_block_backward if fused else reference_block_backward
    backward(grad_out.contiguous(), q, k, v, out, lse, rects(keys, keys, True, q.shape[2], k.shape[2]), scale, grads)
    return grads[0].to(q.dtype), grads[1].to(k.dtype), grads[2].to(v.dtype)


@document_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, keys, scale, fused):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, keys, scale, fused = inputs
    ctx.save_for_backward(q, k, v, keys, *output)
    ctx.scale, ctx.fused = scale, fused


def _backward(ctx, grad_out, grad_lse):
    q, k, v, keys, out, lse = ctx.saved_tensors
    dq, dk, dv = document_attention_backward(grad_out, q, k, v, out, lse, keys, ctx.scale, ctx.fused)
    return dq, dk, dv, None, None, None


document_attention.register_autograd(_backward, setup_context=_setup)
