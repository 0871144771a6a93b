"""Context-parallel pieces on one process: the chunk layout, and the ring-attention kernel
(a ring of one, chunks in zigzag order) against the model's own SDPA attention."""

from __future__ import annotations

import pytest
import torch

from plait.models.attention import causal_attention, document_attention, document_keys
from plait.parallel.context_parallel import SequenceLayout
from plait.parallel.ring_attention import ChunkPlan, ring_attention


@pytest.mark.parametrize("zigzag", [True, False])
def test_layout_covers_every_token_once_with_equal_causal_work(zigzag):
    cp, seq = 4, 32
    layout = SequenceLayout(cp, zigzag)
    indices = [layout.token_index(r, seq) for r in range(cp)]
    assert torch.equal(torch.cat(indices).sort().values, torch.arange(seq))
    assert layout.rank_chunks(1) == ((1, 6) if zigzag else (1,))
    # Causal work of a token = the keys it sees = its index + 1.
    work = [int((idx + 1).sum()) for idx in indices]
    if zigzag:
        assert len(set(work)) == 1
    else:
        assert max(work) > 3 * min(work)
    batch = torch.arange(2 * seq).view(2, seq)
    assert torch.equal(layout.shard(batch, 2), batch[:, indices[2]])


@pytest.mark.parametrize("kernel", ["fused", "reference"])
@pytest.mark.parametrize("docs", [False, True], ids=["causal", "documents"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_ring_kernel_matches_sdpa(docs, kv_heads, kernel):
    torch.manual_seed(0)
    batch, heads, seq, dim = 2, 4, 16, 8
    q = torch.randn(batch, heads, seq, dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq, dim, dtype=torch.float64, requires_grad=True)
    # Row 0: documents of 5, 7 and 4 tokens, none a multiple of the chunk length; row 1: one.
    positions = torch.stack([torch.cat([torch.arange(5), torch.arange(7), torch.arange(4)]), torch.arange(seq)])
    want = causal_attention(q, k, v, document_keys(positions) if docs else None, kernel="reference")
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)

    chunks = (0, 3, 1, 2)  # zigzag order for cp = 2, all on one rank
    index = torch.cat([torch.arange(c * 4, (c + 1) * 4) for c in chunks])
    keys = torch.arange(seq) - positions if docs else None
    got = ring_attention(q[:, :, index], k[:, :, index], v[:, :, index], ChunkPlan(chunks, (chunks,), keys), None,
                         kernel=kernel)
    got_grads = torch.autograd.grad(got, (q, k, v), grad[:, :, index])
    torch.testing.assert_close(got, want[:, :, index], rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", ["fused", "reference"])
def test_ring_kernel_accumulates_bf16_in_fp32(kernel):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    want = causal_attention(q, k, v, None)
    got = ring_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), ChunkPlan((0,), ((0,),), None), None,
                         kernel=kernel)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.05


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "mqa"])
def test_packed_documents_match_the_dense_mask(kv_heads):
    """The fused path (one SDPA per document) against the dense-mask reference, forward and
    backward, with documents of 1 token, of several, and a row that is one document."""
    torch.manual_seed(0)
    q = torch.randn(3, 4, 24, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(3, kv_heads, 24, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    positions = torch.stack([
        torch.cat([torch.arange(1), torch.arange(9), torch.arange(13), torch.arange(1)]),
        torch.cat([torch.arange(12), torch.arange(12)]),
        torch.arange(24),
    ])
    keys = document_keys(positions)
    grad = torch.randn(3, 4, 24, 8, dtype=torch.float64)
    outs = {}
    for kernel in ("fused", "reference"):
        out = causal_attention(q, k, v, keys, kernel=kernel)
        outs[kernel] = (out, torch.autograd.grad(out, (q, k, v), grad))
    # The per-document operator on the explicit block math: what ``auto`` runs off the CPU.
    out = document_attention(q, k, v, keys, 8 ** -0.5, False)[0]
    outs["math"] = (out, torch.autograd.grad(out, (q, k, v), grad))
    for kernel in ("fused", "math"):
        torch.testing.assert_close(outs[kernel][0], outs["reference"][0], rtol=1e-12, atol=1e-12)
        for got, want in zip(outs[kernel][1], outs["reference"][1]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_document_operator_passes_opcheck(fused):
    """The custom operator's fake shapes, strides and autograd agree with its real outputs."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 12, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, 12, 8, requires_grad=True) for _ in range(2))
    keys = document_keys(torch.stack([torch.cat([torch.arange(5), torch.arange(7)]), torch.arange(12)]))
    torch.library.opcheck(document_attention, (q, k, v, keys, 0.35, fused))
