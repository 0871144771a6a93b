"""Gated linear attention (GLA, Yang et al. 2023): the math, in its three forms.

Per head, a state S (d_k x d_v) is decayed by a data-dependent gate α_t ∈ (0, 1)^{d_k} and fed
one outer product per token:

    S_t = Diag(α_t) · S_{t-1} + k_tᵀ v_t,        o_t = q_t · S_t

Gates come in log space (``g = log α ≤ 0``) and are summed, never multiplied, so long products
of small gates underflow to an honest 0 instead of losing precision along the way.

- ``recurrent``: the recurrence token by token. The reference, and generation (one token
  costs one state update: O(1) memory per layer instead of a KV cache).
- ``chunked``: training. The sequence is cut into chunks of C tokens; inside a chunk the output
  is a masked matmul (intra), the state enters each chunk once (inter), and only the states at
  chunk boundaries are passed along (one small recurrence over s/C chunks). Inside a chunk,
  sub-chunks of 16 tokens are paired by matmuls with the decay split at the later sub-chunk's
  start, so every exponent is ≤ 0 and nothing overflows however small the gates; the 16 x 16
  diagonal blocks take the exact pairwise decays.
- ``chunked`` compiled (``model.gla_kernel``): the per-chunk math through torch.compile; the
  boundary recurrence stays eager (a loop over chunks would unroll in the graph).

Training keeps only q, k, v, the gates and the chunk boundary states for backward: the
per-chunk math is recomputed there (activation memory per token of the order of softmax
flash attention's, for about a third more of the mixer's compute).

Packed documents: ``resets`` (batch, seq) marks each token that starts a document; the state
is reset before it (decay 0 across the boundary), in every form.

Context parallelism (LASP-2, plait/parallel/lasp2.py) builds on two pieces: ``chunked`` from a
zero state gives a rank's output without the past and its state summary, and ``carry_in`` adds
what an incoming state contributes, ``(q_i ⊙ Π_{j≤i} α_j) · S`` up to the first reset.

Shapes: q, k, g (batch, heads, seq, d_k); v (batch, heads, seq, d_v); states (batch, heads,
d_k, d_v). Math runs in fp32 (fp64 for fp64 inputs); outputs come back in v's dtype, states in
the math dtype.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

SUB_CHUNK = 16  # tokens per diagonal block of the exact pairwise decays


def math_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def document_resets(keys: torch.Tensor | None) -> torch.Tensor | None:
    """(batch, seq) document keys (plait/models/attention.py) -> True where a document starts
    after another one; None stays None (one document per row)."""
    if keys is None:
        return None
    resets = torch.zeros_like(keys, dtype=torch.bool)
    resets[:, 1:] = keys[:, 1:] != keys[:, :-1]
    return resets


def recurrent(q, k, v, g, resets=None, state=None):
    """Token by token: (output (b, h, s, d_v), final state)."""
    dtype = math_dtype(q)
    q, k, v, g = (x.to(dtype) for x in (q, k, v, g))
    batch, heads, seq, dk = q.shape
    if state is None:
        state = q.new_zeros(batch, heads, dk, v.shape[-1])
    state = state.to(dtype)
    outs = []
    for t in range(seq):
        decay = g[:, :, t].exp()
        if resets is not None:
            decay = decay * (~resets[:, t]).to(dtype)[:, None, None]
        state = decay[..., None] * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append((q[:, :, t, None, :] @ state).squeeze(-2))
    return torch.stack(outs, dim=2), state


def _pad(x: torch.Tensor, pad: int, dim: int = 2) -> torch.Tensor:
    if not pad:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def chunk_math(q, k, v, g, resets, chunk: int):
    """Everything per chunk, with no chunk depending on another. Inputs are padded to a whole
    number of chunks and viewed (b, h, n, C, d); ``resets`` (b, n, C) or None. Returns:

    - ``intra`` (b, h, n, C, d_v): each token's output from its own chunk;
    - ``q_in`` (b, h, n, C, d_k): q_i ⊙ Π_{chunk start ≤ j ≤ i} α_j, zero after a reset: what
      multiplies the chunk's incoming state;
    - ``decay`` (b, h, n, d_k): how the incoming state decays over the chunk (0 on a reset);
    - ``summary`` (b, h, n, d_k, d_v): the chunk's own state at its end (from a zero state).
    """
    cum = g.cumsum(-2)  # B_i: log of the gate product from the chunk start through i
    last = cum[..., -1:, :]
    length = q.shape[-2]
    if resets is None:
        open_ = same_doc = last_doc = None
    else:
        doc = resets.cumsum(-1)  # (b, n, C): document number within the chunk
        open_ = (doc == 0)[:, None, ..., None].to(q.dtype)  # the incoming state still counts
        same_doc = (doc[..., :, None] == doc[..., None, :])[:, None].to(q.dtype)  # (b, 1, n, C, C)
        last_doc = (doc == doc[..., -1:])[:, None, ..., None].to(q.dtype)  # shares the chunk end's document

    q_in = q * cum.exp()
    decay = last.squeeze(-2).exp()
    key_to_end = k * (last - cum).exp()  # exponents ≤ 0
    if open_ is not None:
        q_in = q_in * open_
        decay = decay * open_[..., -1, :]
        key_to_end = key_to_end * last_doc
    summary = key_to_end.transpose(-1, -2) @ v

    sub = SUB_CHUNK if length % SUB_CHUNK == 0 else length
    m = length // sub
    split = lambda x: x.unflatten(-2, (m, sub))  # noqa: E731  (.., C, d) -> (.., m, sub, d)
    qs, ks, cums = split(q), split(k), split(cum)
    # Diagonal sub-blocks: exact pairwise decays exp(B_i - B_j), j ≤ i.
    causal = torch.ones(sub, sub, dtype=torch.bool, device=q.device).tril()
    diff = cums[..., :, None, :] - cums[..., None, :, :]  # (.., m, sub, sub, d_k)
    pair = torch.where(causal[..., None], diff, torch.full_like(diff, float("-inf"))).exp()
    diagonal = torch.einsum("...id,...jd,...ijd->...ij", qs, ks, pair)  # (.., m, sub, sub)
    # Off-diagonal: split each decay at the query sub-chunk's first token r_a, where
    # B_i - r_a ≤ 0 for its queries and r_a - B_j ≤ 0 for every earlier key.
    ref = cums[..., :1, :]  # (.., m, 1, d_k)
    q_scaled = qs * (cums - ref).exp()
    earlier = torch.arange(length, device=q.device)[None, :] < (torch.arange(m, device=q.device) * sub)[:, None]
    k_exp = ref - cum[..., None, :, :]  # (.., m, C, d_k)
    k_scaled = k[..., None, :, :] * torch.where(earlier[..., None], k_exp, torch.full_like(k_exp, float("-inf"))).exp()
    scores = q_scaled @ k_scaled.transpose(-1, -2)  # (.., m, sub, C)
    block = torch.eye(m, dtype=q.dtype, device=q.device)
    scores = scores + (diagonal[..., :, :, None, :] * block[:, None, :, None]).flatten(-2)
    scores = scores.flatten(-3, -2)  # (.., C, C)
    if same_doc is not None:
        scores = scores * same_doc
    return scores @ v, q_in, decay, summary


@functools.cache
def _compiled_chunk_math():
    return torch.compile(chunk_math, dynamic=False)


def chunked(q, k, v, g, resets=None, chunk: int = 64, state=None, compiled: bool = False):
    """The chunked training form: (output (b, h, s, d_v) in v's dtype, final state)."""
    out_dtype, dtype = v.dtype, math_dtype(q)
    batch, heads, seq, dk = q.shape
    chunk = min(chunk, seq)
    pad = -seq % chunk
    q, k, v, g = (_pad(x.to(dtype), pad) for x in (q, k, v, g))  # zero keys and gates: no effect
    n = (seq + pad) // chunk
    view = lambda x: x.unflatten(2, (n, chunk))  # noqa: E731
    r = None if resets is None else _pad(resets, pad, dim=1).unflatten(1, (n, chunk))
    math = _compiled_chunk_math() if compiled else chunk_math
    args = (view(q), view(k), view(v), view(g), r, chunk)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, g)):
        # Recomputed in backward, as flash attention does: the pairwise decays would otherwise
        # keep ~16·d_k floats per token and head alive, several times softmax attention's.
        intra, q_in, decay, summary = checkpoint(math, *args, use_reentrant=False)
    else:
        intra, q_in, decay, summary = math(*args)
    # The boundary recurrence: the state entering each chunk.
    entering = []
    current = q.new_zeros(batch, heads, dk, v.shape[-1]) if state is None else state.to(dtype)
    for c in range(n):
        entering.append(current)
        current = decay[:, :, c, :, None] * current + summary[:, :, c]
    out = intra + q_in @ torch.stack(entering, dim=2)
    return out.flatten(2, 3)[:, :, :seq].to(out_dtype), current


def piece_decay(g: torch.Tensor, resets: torch.Tensor | None) -> torch.Tensor:
    """(b, h, d_k): how a state entering a run of tokens decays over all of it (0 on a reset)."""
    decay = g.to(math_dtype(g)).sum(2).exp()
    if resets is not None:
        decay = decay * (~resets.any(-1)).to(decay.dtype)[:, None, None]
    return decay


def carry_in(q, g, resets, state) -> torch.Tensor:
    """What a state entering a run of tokens adds to their outputs: (q_i ⊙ Π_{j≤i} α_j) · S,
    zero from the run's first reset on. (b, h, s, d_v) in the math dtype."""
    dtype = math_dtype(q)
    q_in = q.to(dtype) * g.to(dtype).cumsum(2).exp()
    if resets is not None:
        q_in = q_in * (resets.cumsum(-1) == 0).to(dtype)[:, None, :, None]
    return q_in @ state.to(dtype)
