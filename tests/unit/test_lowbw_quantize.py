"""Quantization of outer gradients, one process: error bounds, groups, bytes, error feedback."""

from __future__ import annotations

import pytest
import torch

from plait.lowbw.quantize import (
    QUANT_KINDS, dequantize, from_bytes, quantize, scale_groups, to_bytes, wire_bytes,
)
from plait.lowbw.reduce import ErrorFeedback, quantized_mean, split_runs

SHAPES = [torch.Size([6, 10]), torch.Size([9]), torch.Size([])]  # a matrix, a vector, a 0-d scalar
NUMEL = 60 + 9 + 1
QMAX = {"int8": 127, "int4": 7}


@pytest.fixture(autouse=True)
def _one_thread():
    """Vectors of a few dozen elements: on a shared machine, thread-pool wake-ups cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _vector(seed: int = 0) -> torch.Tensor:
    """Values spanning four orders of magnitude across rows, as gradients of different layers do."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(NUMEL, generator=gen)
    return x * torch.logspace(-3, 1, NUMEL)[torch.randperm(NUMEL, generator=gen)]


def _group_bound(x: torch.Tensor, groups: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-element bound absmax/qmax/2 of its group, computed group by group (the slow, obvious way)."""
    return torch.cat([part.abs().max().expand(len(part)) / qmax / 2 for part in x.split(groups.tolist())])


def test_scale_groups_row_and_block():
    assert scale_groups(SHAPES, "row", 0).tolist() == [10] * 6 + [9, 1]
    assert scale_groups(SHAPES, "block", 32).tolist() == [32, 32, 6]
    assert scale_groups(SHAPES, "block", 70).tolist() == [70]
    assert scale_groups([torch.Size([0, 4]), torch.Size([3])], "row", 0).tolist() == [3]
    with pytest.raises(ValueError, match="scale mode 'col'"):
        scale_groups(SHAPES, "col", 8)
    with pytest.raises(ValueError, match="block 0"):
        scale_groups(SHAPES, "block", 0)


@pytest.mark.parametrize("mode,block", [("row", 0), ("block", 16), ("block", 7)])
@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_round_trip_error_within_half_a_step(kind, mode, block):
    x = _vector()
    groups = scale_groups(SHAPES, mode, block)
    q = quantize(x.double(), groups, kind)  # any float dtype in; float32 out
    y = dequantize(q, groups)
    assert y.dtype == torch.float32 and y.shape == x.shape
    if kind == "none":
        assert torch.equal(y, x)
    elif kind == "fp16":
        torch.testing.assert_close(y, x.half().float(), rtol=0, atol=0)
    else:
        bound = _group_bound(x, groups, QMAX[kind])
        assert ((y - x).abs() <= bound * (1 + 1e-6) + 1e-12).all()
        assert torch.allclose(q.scales, torch.stack([p.abs().max() for p in x.split(groups.tolist())]) / QMAX[kind])
        # Row scales fit each row's magnitude: the bound is far tighter than one scale for all.
        assert (y - x).abs().max() < x.abs().max() / QMAX[kind]


def test_row_scales_beat_one_scale_on_rows_of_different_magnitude():
    gen = torch.Generator().manual_seed(4)
    x = torch.cat([torch.randn(10, generator=gen) * 10.0 ** -k for k in range(7)])
    shapes = [torch.Size([7, 10])]
    err = {mode: (dequantize(quantize(x, g, "int4"), g) - x)[50:60].abs().max()
           for mode, g in (("row", scale_groups(shapes, "row", 0)), ("block", scale_groups(shapes, "block", 70)))}
    assert err["row"] * 5 < err["block"]  # one scale for all rounds the 1e-5 row to zero


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_zero_groups_decode_to_zero(kind):
    x = torch.zeros(25)
    x[10:15] = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    groups = torch.tensor([5, 5, 5, 5, 5])
    q = quantize(x, groups, kind)
    assert torch.equal(q.scales, torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0]) / QMAX[kind])
    y = dequantize(q, groups)
    assert torch.isfinite(y).all() and (y[:10] == 0).all() and (y[15:] == 0).all()


def test_int4_packs_two_per_byte_with_odd_numel():
    x = torch.tensor([7.0, -7.0, 0.0, 3.0, -1.0])
    groups = torch.tensor([5])
    q = quantize(x, groups, "int4")
    assert q.payload.dtype == torch.uint8 and q.payload.numel() == 3
    # nibble = value + 8, low nibble first; the odd tail is padded with the zero nibble 8.
    assert q.payload.tolist() == [(1 << 4) | 15, (11 << 4) | 8, (8 << 4) | 7]
    assert dequantize(q, groups).tolist() == x.tolist()


@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_bytes_round_trip_and_length(kind):
    x = _vector(1)
    groups = scale_groups(SHAPES, "block", 16)
    q = quantize(x, groups, kind)
    buf = to_bytes(q)
    assert buf.dtype == torch.uint8 and buf.dim() == 1
    assert len(buf) == wire_bytes(kind, NUMEL, len(groups))
    # Cut at an odd offset, as a piece of a received buffer may be: still decodes.
    shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), buf])[1:]
    for b in (buf, shifted):
        assert torch.equal(dequantize(from_bytes(b, kind, NUMEL, len(groups)), groups), dequantize(q, groups))
    with pytest.raises(ValueError, match="must be"):
        from_bytes(buf[:-1], kind, NUMEL, len(groups))


def test_compression_ratios():
    numel, n_groups = 1 << 20, (1 << 20) // 128
    fp32 = wire_bytes("none", numel, n_groups)
    assert fp32 == 4 * numel
    assert wire_bytes("fp16", numel, n_groups) == fp32 // 2
    assert wire_bytes("int8", numel, n_groups) == numel + 4 * n_groups
    assert wire_bytes("int4", numel, n_groups) == numel // 2 + 4 * n_groups
    assert wire_bytes("int4", 5, 1) == 3 + 4
    assert abs(wire_bytes("int8", numel, n_groups) / fp32 - (1 / 4 + 1 / 128)) < 1e-9
    assert abs(wire_bytes("int4", numel, n_groups) / fp32 - (1 / 8 + 1 / 128)) < 1e-9


def test_unknown_kind_names_the_value():
    with pytest.raises(ValueError, match="quant kind 'int2'"):
        quantize(torch.ones(3), torch.tensor([3]), "int2")


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_error_feedback_running_mean_converges(kind):
    """Sending the same vector again and again: with feedback the mean of what arrived tends
    to the vector (error ~ residual / steps); without it the rounding error stays put."""
    x = _vector(2)
    groups = scale_groups(SHAPES, "row", 0)
    feedback = ErrorFeedback()
    steps = 200
    sent = {"with": torch.zeros(NUMEL), "without": torch.zeros(NUMEL)}
    for _ in range(steps):
        sent["with"] += quantized_mean(x, groups, kind, None, feedback.residual("outer", x))
        sent["without"] += quantized_mean(x, groups, kind, None)
    err = {k: (v / steps - x).abs().max().item() for k, v in sent.items()}
    assert err["without"] > 0
    assert err["with"] < err["without"] / 20
    # The residual stays bounded by one quantization step of flat + residual.
    assert feedback.residual("outer", x).abs().max() <= 2 * x.abs().max() / QMAX[kind]


def test_error_feedback_state_round_trip():
    x = _vector(3)
    groups = scale_groups(SHAPES, "block", 8)
    first = ErrorFeedback()
    quantized_mean(x, groups, "int4", None, first.residual("a", x))
    second = ErrorFeedback()
    second.load_state_dict(first.state_dict())
    assert torch.equal(second.residual("a", x), first.residual("a", x))
    a = quantized_mean(x, groups, "int4", None, first.residual("a", x))
    b = quantized_mean(x, groups, "int4", None, second.residual("a", x))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="residual 'a' has shape"):
        second.residual("a", torch.zeros(4))


def test_split_runs_balanced_whole_groups():
    groups = torch.tensor([5, 5, 5, 7, 1])
    assert split_runs(groups, 1) == ([5], [23])
    assert split_runs(groups, 2) == ([2, 3], [10, 13])
    counts, sizes = split_runs(groups, 8)  # more ranks than groups: some runs are empty
    assert sum(counts) == 5 and sum(sizes) == 23 and 0 in counts
    assert split_runs(torch.full((8,), 4), 4) == ([2] * 4, [8] * 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_cuda_gives_the_bytes_cpu_gives(kind):
    x = _vector(5)
    groups = scale_groups(SHAPES, "row", 0)
    on_cuda = to_bytes(quantize(x.cuda(), groups, kind))
    assert on_cuda.is_cuda and torch.equal(on_cuda.cpu(), to_bytes(quantize(x, groups, kind)))
    decoded = dequantize(from_bytes(on_cuda, kind, NUMEL, len(groups)), groups)
    assert decoded.is_cuda and torch.equal(decoded.cpu(), dequantize(quantize(x, groups, kind), groups))
