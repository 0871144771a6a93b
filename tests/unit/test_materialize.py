"""Materializing a meta-built model from a weight source, and the memory report."""

from __future__ import annotations

import pytest
import torch

from plait.config import ModelConfig
from plait.models.init import full_region, normal_region
from plait.models.llama import Llama, build_model, init_source
from plait.parallel import materialize as mat
from plait.train import memory_report

CFG = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 24], ids=["row", "rows", "whole"])
def test_materialize_in_chunks_gives_the_init(monkeypatch, chunk):
    """The source is asked a few rows at a time; the result is bitwise the single init."""
    monkeypatch.setattr(mat, "CHUNK_ELEMENTS", chunk)
    with torch.device("meta"):
        model = Llama(CFG)
    mat.materialize(model, torch.device("cpu"), init_source(CFG, seed=5))
    want = build_model(CFG, seed=5)
    for (name, got), (_, expected) in zip(model.state_dict().items(), want.state_dict().items()):
        assert torch.equal(got, expected), name
    assert torch.equal(model.inv_freq, want.inv_freq)  # the buffer is recomputed, not left empty


def test_any_region_is_the_slice_of_the_whole():
    shape = (300, 70)
    whole = normal_region(3, "w", shape, full_region(shape), 0.02)
    for region in [(slice(0, 1), slice(0, 70)), (slice(17, 250), slice(5, 6)), (slice(299, 300), slice(0, 70)),
                   (slice(100, 101), slice(69, 70))]:
        assert torch.equal(normal_region(3, "w", shape, region, 0.02), whole[region])
    assert not torch.equal(normal_region(4, "w", shape, full_region(shape), 0.02), whole)


def test_a_wrong_shape_from_the_source_is_refused():
    with torch.device("meta"):
        model = Llama(CFG)
    with pytest.raises(ValueError, match="tok_embeddings.weight"):
        mat.materialize(model, torch.device("cpu"), lambda name, region: torch.zeros(1, 1))


def test_memory_report_counts_what_the_rank_holds():
    model = build_model(CFG, seed=0)
    optimizer = torch.optim.AdamW(model.parameters())
    params = sum(p.numel() for p in model.parameters()) * 4
    before = memory_report.measure([model], None, torch.device("cpu"))
    assert (before["params"], before["grads"], before["optimizer"]) == (params, 0, 0)
    model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    optimizer.step()
    after = memory_report.measure([model], optimizer, torch.device("cpu"))
    assert (after["params"], after["grads"], after["optimizer"]) == (params, params, 2 * params)
    assert after["peak"] >= before["peak"] > 0
    text = memory_report.report([after, after], "after the first step")
    assert text.splitlines()[0] == "plait: memory after the first step (2 rank(s)):"
    assert text.splitlines()[1].startswith("  rank 0: params ") and len(text.splitlines()) == 3


def test_memory_report_of_a_large_world_lists_the_extremes():
    rows = [{"params": 1.0, "grads": 0.0, "optimizer": 0.0, "peak": float(p)} for p in [5, 9, 1, *[4] * 30]]
    lines = memory_report.report(rows, "after initialization").splitlines()
    assert "33 rank(s), smallest and largest peak shown" in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["rank 0", "rank 1", "rank 2"]
