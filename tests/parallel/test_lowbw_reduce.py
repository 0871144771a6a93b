"""quantized_mean on 4 gloo ranks: identical bits everywhere, the mean within the quantization
bound, and the bytes plait.telemetry.collectives counts equal to the formula.

One spawn runs every case (spawning costs seconds); ranks return their inputs, results and
counted bytes, and the asserts run here, so a failure names the case and the rank.

Bytes sent per rank r of n (padding included, as comm counts it):
    sum_{j != r} b_j + (n - 1) * max_j b_j,   b_j = wire_bytes(kind, elements of run j, groups of run j)
the all_to_all sends every run's piece but one's own, the all-gather sends one's own run
padded to the largest to each of the n - 1 others.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from plait.launch import spawn
from plait.lowbw.quantize import QUANT_KINDS, scale_groups, wire_bytes
from plait.lowbw.reduce import ErrorFeedback, quantized_mean, sent_bytes, split_runs
from plait.telemetry import collectives as comm

N = 4
DIM = "dp_replicate"
QMAX = {"int8": 127, "int4": 7}
MIXED = [torch.Size([8, 16]), torch.Size([16]), torch.Size([])]  # a matrix, a vector, a 0-d scalar
# name -> (shapes, scale mode, block)
LAYOUTS = {
    "row": (MIXED, "row", 0),
    "block": (MIXED, "block", 32),
    "few_groups_row": ([torch.Size([3, 5])], "row", 0),  # 3 groups on 4 ranks: one run is empty
    "few_groups_block": (MIXED, "block", 64),
    "even": ([torch.Size([8, 16])], "row", 0),  # equal runs: 'none' moves a ring all-reduce's bytes
}
CASES = [(kind, layout) for kind in QUANT_KINDS for layout in LAYOUTS]


def _flat(layout: str, rank: int) -> torch.Tensor:
    """Rank ``rank``'s vector: rows of magnitudes 1e-3 to 10, different on every rank."""
    shapes = LAYOUTS[layout][0]
    numel = sum(s.numel() for s in shapes)
    gen = torch.Generator().manual_seed(1000 * rank + list(LAYOUTS).index(layout))
    return torch.randn(numel, generator=gen) * torch.logspace(-3, 1, numel)[torch.randperm(numel, generator=gen)]


def _groups(layout: str) -> torch.Tensor:
    shapes, mode, block = LAYOUTS[layout]
    return scale_groups(shapes, mode, block)


def _plain(x: torch.Tensor) -> list[float]:
    """A float32 tensor as Python floats (exact, -0.0 kept): a tensor put on the results queue
    travels through shared memory that vanishes when its rank exits."""
    return x.tolist()


def _tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _counted(fn) -> tuple[list[float], int]:
    comm.reset()
    out = fn()
    return _plain(out), comm.step_summary()["comm_bytes"].get(DIM, 0)


def _checks() -> dict:
    torch.set_num_threads(1)
    comm.install()
    group = dist.group.WORLD
    comm.register_group(group, DIM)
    rank = dist.get_rank()
    out: dict = {}
    for kind, layout in CASES:
        flat = _flat(layout, rank)
        out[kind, layout] = _counted(lambda: quantized_mean(flat, _groups(layout), kind, group))

    # Error feedback across ranks: the residual is this rank's own, the mean still identical.
    feedback = ErrorFeedback()
    flat = _flat("row", rank)
    residual = feedback.residual("outer", flat)
    out["feedback"] = [_plain(quantized_mean(flat, _groups("row"), "int4", group, residual)) for _ in range(3)]
    out["residual"] = _plain(residual)

    # A subgroup of ranks {0, 2} / {1, 3}: group ranks differ from global ranks.
    pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    pair = pairs[rank % 2]
    comm.register_group(pair, DIM)
    out["pair"] = _counted(lambda: quantized_mean(_flat("row", rank), _groups("row"), "int4", pair))
    comm.uninstall()
    return out


@pytest.fixture(scope="module")
def ranks():
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # 4 ranks on a shared 2-core machine
        results = spawn(_checks, N)
    return [{key: (_tensor(value[0]), value[1]) if isinstance(value, tuple) else value
             for key, value in out.items()} for out in results]


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)  # torch.equal would take -0.0 for 0.0


def _expected_bytes(kind: str, groups: torch.Tensor, n: int, rank: int) -> int:
    counts, sizes = split_runs(groups, n)
    b = [wire_bytes(kind, size, count) for size, count in zip(sizes, counts)]
    return sum(b[j] for j in range(n) if j != rank) + (n - 1) * max(b)


@pytest.mark.parametrize("kind,layout", CASES)
def test_identical_bits_on_every_rank(ranks, kind, layout):
    first = ranks[0][kind, layout][0]
    assert first.dtype == torch.float32 and first.numel() == _flat(layout, 0).numel()
    for rank, out in enumerate(ranks):
        assert torch.equal(_bits(out[kind, layout][0]), _bits(first)), f"rank {rank} differs from rank 0"


@pytest.mark.parametrize("kind,layout", CASES)
def test_mean_within_quantization_bound(ranks, kind, layout):
    flats = torch.stack([_flat(layout, r) for r in range(N)])
    got = ranks[0][kind, layout][0]
    mean = flats.double().mean(0)
    if kind == "none":
        rank_order = flats[0]
        for r in range(1, N):
            rank_order = rank_order + flats[r]
        assert torch.equal(got, rank_order / N)  # float32 sum in rank order, then / n
        torch.testing.assert_close(got.double(), mean, rtol=1e-6, atol=1e-6 * flats.abs().max().item())
        return
    if kind == "fp16":
        eps = 2.0 ** -11  # fp16 rounding, relative; below 2**-14 the absolute step is 2**-25
        first = eps * flats.abs().double().mean(0) + 2.0 ** -25
        bound = first + eps * (mean.abs() + first) + 2.0 ** -25
    else:
        # Each rank's piece is off by at most its group's absmax / qmax / 2; the re-quantized
        # mean adds at most the same for the averaged group.
        groups = _groups(layout).tolist()
        qmax = QMAX[kind]

        def half_step(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([p.abs().max().expand(len(p)) for p in x.split(groups)]) / qmax / 2

        first = torch.stack([half_step(f.double()) for f in flats]).mean(0)
        bound = first + half_step(mean.abs() + first)
    err = (got.double() - mean).abs()
    assert (err <= bound * (1 + 1e-5) + 1e-12).all(), f"worst excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("kind,layout", CASES)
def test_counted_bytes_equal_formula(ranks, kind, layout):
    groups = _groups(layout)
    for rank, out in enumerate(ranks):
        want = _expected_bytes(kind, groups, N, rank)
        assert out[kind, layout][1] == want == sent_bytes(kind, groups, N, rank), f"rank {rank}"


def test_none_on_equal_runs_costs_a_ring_all_reduce(ranks):
    numel = _flat("even", 0).numel()
    for out in ranks:
        assert out["none", "even"][1] == 2 * (N - 1) * 4 * numel // N


def test_quantized_bytes_shrink(ranks):
    sent = {kind: ranks[0][kind, "row"][1] for kind in QUANT_KINDS}
    assert sent["fp16"] * 2 == sent["none"]
    assert sent["int8"] < sent["none"] / 3 and sent["int4"] < sent["none"] / 5


def test_error_feedback_keeps_ranks_identical(ranks):
    for step in range(3):
        for rank, out in enumerate(ranks):
            assert torch.equal(_bits(_tensor(out["feedback"][step])), _bits(_tensor(ranks[0]["feedback"][step]))), \
                f"rank {rank}"
    residuals = [_tensor(out["residual"]) for out in ranks]
    for rank, res in enumerate(residuals):
        flat = _flat("row", rank)
        assert res.abs().max() > 0
        # The residual is what this rank's own quantization dropped: within one step of flat + residual.
        assert res.abs().max() <= 2 * flat.abs().max() / QMAX["int4"], f"rank {rank}"
    assert not torch.equal(residuals[0], residuals[1])


def test_subgroup_uses_group_ranks(ranks):
    groups = _groups("row")
    for rank, out in enumerate(ranks):
        partner = ranks[(rank + 2) % N]
        assert torch.equal(_bits(out["pair"][0]), _bits(partner["pair"][0])), f"rank {rank}"
        assert out["pair"][1] == _expected_bytes("int4", groups, 2, rank // 2)
        flats = torch.stack([_flat("row", rank % 2), _flat("row", rank % 2 + 2)])
        assert (out["pair"][0] - flats.mean(0)).abs().max() <= flats.abs().max() / QMAX["int4"]
    assert not torch.equal(ranks[0]["pair"][0], ranks[1]["pair"][0])
