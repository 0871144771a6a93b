"""The plain model: document masking, KV-cache decoding, deterministic meta-device init."""

from __future__ import annotations

import torch

from plait.config import ModelConfig
from plait.infer.generate import generate, sample_next
from plait.models.attention import dense_mask, document_keys
from plait.models.llama import KVCache, build_model, rope_inv_freq

CFG = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)


def test_packed_documents_do_not_attend_across_boundaries():
    model = build_model(CFG, seed=0)
    doc_a, doc_b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 9))
    packed = torch.cat([doc_a, doc_b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        out = model(packed, positions)
        alone_a, alone_b = model(doc_a), model(doc_b)
        unmasked = model(packed, positions, doc_mask=False)
    torch.testing.assert_close(out[:, :7], alone_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, 7:], alone_b, rtol=0, atol=1e-5)
    assert (unmasked[:, 7:] - alone_b).abs().max() > 1e-3  # the mask is what makes them equal


def test_document_mask_shape_and_fast_path():
    assert document_keys(torch.arange(8)[None]) is None
    mask = dense_mask(document_keys(torch.tensor([[0, 1, 2, 0, 1]])))
    assert mask.shape == (1, 1, 5, 5)
    assert not mask[0, 0, 3, 2] and mask[0, 0, 4, 3] and not mask[0, 0, 1, 2]


def test_kv_cache_matches_full_forward():
    model = build_model(CFG, seed=1).eval()
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.empty(CFG, 1, 16, "cpu", torch.float32)
        prefill = model(ids[:, :5], cache=cache)
        chunk = model(ids[:, 5:8], cache=cache)  # several tokens at once after a prefix
        steps = [model(ids[:, i : i + 1], cache=cache) for i in range(8, 12)]
    got = torch.cat([prefill, chunk, *steps], dim=1)
    torch.testing.assert_close(got, full, rtol=0, atol=1e-5)


def test_greedy_generation_is_argmax_of_full_forward():
    model = build_model(CFG, seed=2).eval()
    prompt = [3, 14, 15, 9]
    out = generate(model, prompt, 6, temperature=0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]


def test_sampling_filters():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    assert all(int(sample_next(logits, 1.0, 1, 1.0, gen)) == 1 for _ in range(20))  # top-k 1
    assert all(int(sample_next(logits, 1.0, 0, 0.5, gen)) == 1 for _ in range(20))  # top-p small
    seen = {int(sample_next(logits, 1.0, 2, 1.0, gen)) for _ in range(200)}
    assert seen == {1, 2}


def test_init_is_deterministic_and_seeded():
    a, b, c = build_model(CFG, seed=0), build_model(CFG, seed=0), build_model(CFG, seed=1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.ndim == 2:
            assert not torch.equal(pa, pc), name


def test_llama3_rope_scaling_slows_low_frequencies():
    base = rope_inv_freq(ModelConfig(dim=128, n_heads=1))
    scaled = rope_inv_freq(ModelConfig(dim=128, n_heads=1, rope_scaling="llama3", rope_original_max_seq_len=64))
    assert torch.equal(scaled[:4], base[:4])  # high frequencies kept
    torch.testing.assert_close(scaled[-1], base[-1] / 8.0)  # lowest divided by the factor


def test_rope_frequencies_stay_fp32_after_dtype_cast():
    model = build_model(CFG, seed=0).to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32
    assert torch.equal(model.inv_freq, rope_inv_freq(CFG))
