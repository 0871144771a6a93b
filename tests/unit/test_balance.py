"""Length-balanced batching (plait/data/balance.py)."""

from __future__ import annotations

import json
import random

import pytest

from plait.config import ModelConfig
from plait.data.balance import (
    Assignment, BalancedStream, balance, balance_pieces, coefficients, imbalance, model_coefficients, naive,
    split, work,
)

COEFS = coefficients(dim=64, n_layers=2, ffn_dim=256, n_heads=4, n_kv_heads=2)


def long_tailed(n: int, seed: int, lo: int = 4, hi: int = 300) -> list[int]:
    rng = random.Random(seed)
    return [int(min(hi, max(lo, rng.lognormvariate(3.5, 1.2)))) for _ in range(n)]


def placed(a: Assignment) -> list[tuple[int, int, int]]:
    return [p for r in a.ranks for mb in r for p in mb]


def assert_bins_fit(a: Assignment, capacity: int) -> None:
    for r in a.ranks:
        for mb in r:
            assert sum(p[2] for p in mb) <= capacity


def assert_tiles(pieces, lengths) -> None:
    """Every token of every document in exactly one piece."""
    by_doc: dict[int, list[tuple[int, int]]] = {}
    for d, s, n in pieces:
        by_doc.setdefault(d, []).append((s, n))
    assert sorted(by_doc) == [d for d, n in enumerate(lengths) if n > 0]
    for d, spans in by_doc.items():
        pos = 0
        for s, n in sorted(spans):
            assert s == pos and n > 0
            pos += n
        assert pos == lengths[d]


def test_work_and_coefficients():
    assert work([3, 4], 2.0, 5.0) == 2 * (9 + 16) + 5 * (3 + 4)
    assert work([], 2.0, 5.0) == 0.0
    # dim 8, kv_dim 8 / 2 * 1 = 4: matmuls 2 * (8 * (16 + 8) + 3 * 8 * 16) = 1152 per layer;
    # attention 2 * dim = 16 per squared token per layer.
    assert coefficients(dim=8, n_layers=2, ffn_dim=16, n_heads=2, n_kv_heads=1) == (32.0, 2304.0)
    # A config's n_kv_heads = 0 means one KV head per query head.
    shape = {"dim": 8, "n_layers": 2, "ffn_dim": 16, "n_heads": 2}
    assert model_coefficients(ModelConfig(**shape, n_kv_heads=0)) == coefficients(**shape, n_kv_heads=2)
    assert imbalance([1.0, 3.0]) == 1.5 and imbalance([0.0, 0.0]) == 1.0


def test_naive_windows_in_order():
    a = naive([5, 5, 5, 4], n_ranks=1, micro_per_rank=2, capacity=8, attn_coef=1.0, linear_coef=0.0)
    assert a.ranks == [[[(0, 0, 5), (1, 0, 3)], [(1, 3, 2), (2, 0, 5), (3, 0, 1)]]]
    assert a.leftover == [(3, 1, 3)]
    assert a.padding_waste == 0.0
    assert a.rank_work == [25 + 9 + 4 + 25 + 1]


def test_split_over_long_document():
    assert split([40, 0, 7], 16) == [(0, 0, 16), (0, 16, 16), (0, 32, 8), (2, 0, 7)]
    a = balance([40], n_ranks=2, micro_per_rank=2, capacity=16, attn_coef=1.0, linear_coef=1.0)
    assert sorted(placed(a)) == [(0, 0, 16), (0, 16, 16), (0, 32, 8)] and not a.leftover
    assert_bins_fit(a, 16)
    # Pieces are separate documents for attention: 16^2 + 16^2 + 8^2, not 40^2.
    assert sum(a.rank_work) == 16**2 * 2 + 8**2 + 40
    with pytest.raises(ValueError):
        balance_pieces([(0, 0, 17)], 1, 1, 16, 1.0, 1.0)


def test_balance_places_each_token_once_and_respects_capacity():
    lengths = long_tailed(400, seed=1)
    a = balance(lengths, 4, 2, 256, *COEFS)
    assert_bins_fit(a, 256)
    assert_tiles(placed(a) + a.leftover, lengths)
    assert a.leftover  # the pool is bigger than the step
    assert a.padding_waste < 0.01
    assert a.imbalance == max(a.rank_work) / (sum(a.rank_work) / 4)


def test_balanced_beats_naive_on_long_tail():
    # Attention-heavy ratio (small dim, long documents), so where the long documents land matters.
    coefs = coefficients(dim=64, n_layers=1, ffn_dim=128, n_heads=4, n_kv_heads=4)
    cap = 1024
    for seed in range(3):
        lengths = long_tailed(300, seed=seed, lo=8, hi=cap)
        rng = random.Random(seed)
        rng.shuffle(lengths)
        nv = naive(lengths, 8, 2, cap, *coefs)
        bl = balance(lengths, 8, 2, cap, *coefs)
        assert bl.imbalance <= nv.imbalance
        assert bl.imbalance < 1.05 and bl.padding_waste < 0.02


def test_pinned_pieces_are_placed():
    pieces = [(i, 0, n) for i, n in enumerate([100, 90, 80, 5, 5, 5, 5, 120, 110])]
    a = balance_pieces(pieces, 2, 1, 128, 1.0, 0.0, pinned=3)
    got = {p[0] for p in placed(a)}
    assert {0, 1} <= got  # pinned, and two of the three fit (each bin holds 128 tokens)
    assert_bins_fit(a, 128)
    assert_tiles(placed(a) + a.leftover, [p[2] for p in pieces])


def run_stream(stream: BalancedStream) -> list[Assignment]:
    return list(stream)


def test_stream_covers_corpus_exactly_once():
    lengths = long_tailed(1200, seed=2, hi=1200)  # some documents longer than capacity
    assert max(lengths) > 512
    stream = BalancedStream(lengths, 4, 2, 512, COEFS, seed=3, lookahead=2.0)
    steps = run_stream(stream)
    for a in steps:
        assert_bins_fit(a, 512)
    assert_tiles([p for a in steps for p in placed(a)], lengths)
    assert not steps[-1].leftover
    full = steps[: len(steps) // 2]  # early steps have a full pool
    # Coarse on purpose (few documents a bin, attention-dominated): means, not per-step bounds.
    assert sum(a.padding_waste for a in full) / len(full) < 0.015
    assert sum(a.imbalance for a in full) / len(full) < 1.03


def test_stream_deterministic_and_seeded():
    lengths = long_tailed(300, seed=4)
    one = [a.ranks for a in BalancedStream(lengths, 4, 2, 256, COEFS, seed=7)]
    two = [a.ranks for a in BalancedStream(lengths, 4, 2, 256, COEFS, seed=7)]
    other = [a.ranks for a in BalancedStream(lengths, 4, 2, 256, COEFS, seed=8)]
    assert one == two
    assert one != other


def test_stream_state_dict_round_trip():
    lengths = long_tailed(300, seed=5)
    ref = BalancedStream(lengths, 4, 2, 256, COEFS, seed=1)
    for _ in range(3):
        next(ref)
    state = json.loads(json.dumps(ref.state_dict()))  # must survive a checkpoint file
    resumed = BalancedStream(lengths, 4, 2, 256, COEFS, seed=99)
    resumed.load_state_dict(state)
    assert [a.ranks for a in resumed] == [a.ranks for a in ref]
    assert resumed.step == ref.step
