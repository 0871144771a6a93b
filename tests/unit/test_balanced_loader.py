"""Balanced batching (plait/data/balanced_loader.py) on synthetic token stores.

Token k of a store has id k + 1: unique, so every input tells where it came from, and never
the pad id 0.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from plait.data.balance import coefficients
from plait.data.balanced_loader import PAD_ID, BalancedLoader
from plait.data.loader import StepLoader, StepSampler
from plait.data.packing import IGNORE_INDEX, PackedWindows, TokenStore
from plait.errors import DataError

# Attention-heavy (attention equals the matmuls at s = 640 tokens), so placement matters.
COEFS = coefficients(dim=64, n_layers=2, ffn_dim=128, n_heads=4, n_kv_heads=0)
SEQ, BATCH, MICRO = 32, 8, 2


def long_tailed(n: int, seed: int, hi: int, lo: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [int(min(hi, max(lo, rng.lognormvariate(3.0, 1.0)))) for _ in range(n)]


def store_of(lengths: list[int]) -> TokenStore:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenStore(np.arange(1, offsets[-1] + 1, dtype=np.uint32), offsets)


def loader(store: TokenStore, ranks: list[int], n_ranks: int = 2, seed: int = 0) -> BalancedLoader:
    return BalancedLoader(store, SEQ, BATCH, MICRO, COEFS, seed, n_ranks, ranks)


def rows(micro_batches: list[dict[str, torch.Tensor]]) -> list[dict[str, np.ndarray]]:
    return [{k: mb[k][i].numpy() for k in mb} for mb in micro_batches for i in range(len(mb["input_ids"]))]


def runs(row: dict[str, np.ndarray]) -> list[slice]:
    """The row cut where position_ids restart at 0: its pieces, and its padding."""
    starts = np.flatnonzero(row["position_ids"] == 0).tolist()
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [SEQ])]


@pytest.fixture(scope="module")
def corpus() -> TokenStore:
    lengths = long_tailed(120, seed=0, hi=100)  # some documents longer than SEQ
    assert max(lengths) > SEQ
    return store_of(lengths)


def test_micro_batch_shapes(corpus):
    batches = loader(corpus, [1]).next_step()
    assert len(batches) == BATCH // 2 // MICRO
    for mb in batches:
        assert set(mb) == {"input_ids", "labels", "position_ids"}
        for t in mb.values():
            assert t.shape == (MICRO, SEQ) and t.dtype == torch.int64


def test_epoch_trains_every_token_once_within_its_piece(corpus):
    run = loader(corpus, [0, 1])
    epoch: list[dict[str, np.ndarray]] = []
    while True:
        batches = run.next_step()
        if run.epoch:
            break
        epoch += rows(batches)
    doc_of = lambda ids: np.searchsorted(corpus.offsets, ids - 1, side="right") - 1  # noqa: E731
    inputs, scored, piece_starts = [], [], []
    for row in epoch:
        pieces = runs(row)
        for k, cut in enumerate(pieces):
            ids, labels, pos = row["input_ids"][cut], row["labels"][cut], row["position_ids"][cut]
            assert (pos == np.arange(len(ids))).all()
            if ids[0] == PAD_ID:  # padding: last, its own document, never scored
                assert k == len(pieces) - 1 and (ids == PAD_ID).all() and (labels == IGNORE_INDEX).all()
                continue
            # One piece: consecutive tokens of one document, each scored on the next one of
            # the same piece; the last scores nothing (next token is elsewhere, or none).
            assert (np.diff(ids) == 1).all() and len(set(doc_of(ids))) == 1
            assert (labels[:-1] == ids[1:]).all() and labels[-1] == IGNORE_INDEX
            inputs += ids.tolist()
            scored += labels[:-1].tolist()
            piece_starts.append(int(ids[0]))
    assert sorted(inputs) == list(range(1, corpus.n_tokens + 1))  # every token exactly once
    # Scored as in packed windows (all but each document's first token), except the first
    # token of each continuation piece of a document longer than SEQ.
    doc_firsts = set((corpus.offsets[:-1] + 1).tolist())
    assert doc_firsts <= set(piece_starts)
    continuations = sum(-(-int(n) // SEQ) - 1 for n in np.diff(corpus.offsets))
    assert len(piece_starts) == corpus.n_docs + continuations
    assert sorted(scored) == sorted(set(range(1, corpus.n_tokens + 1)) - set(piece_starts))


def test_ranks_concatenate_to_a_reader_of_all_ranks(corpus):
    """A single process that reads every rank's rows, in rank order, sees dp's whole batch."""
    ranks = [loader(corpus, [r]) for r in range(2)]
    both = loader(corpus, [0, 1])
    for _ in range(18):  # crosses an epoch boundary (~14 steps)
        want = both.next_step()
        got = [mb for run in ranks for mb in run.next_step()]
        assert len(got) == len(want) == BATCH // MICRO
        for x, y in zip(got, want):
            assert all(torch.equal(x[k], y[k]) for k in x)
        assert ranks[0].step_stats() == ranks[1].step_stats() == both.step_stats()
    assert both.epoch >= 1


def test_resume_gives_the_same_next_steps(corpus):
    run = loader(corpus, [1], seed=4)
    for _ in range(7):
        run.next_step()
    state = json.loads(json.dumps(run.state_dict()))  # must survive a checkpoint file
    resumed = loader(corpus, [1], seed=4)
    resumed.load_state_dict(state)
    for _ in range(10):  # crosses an epoch boundary
        for x, y in zip(run.next_step(), resumed.next_step()):
            assert all(torch.equal(x[k], y[k]) for k in x)
    assert run.state_dict() == resumed.state_dict() and run.epoch >= 1


def test_long_tailed_corpus_is_balanced_with_little_padding():
    """4 ranks x 8 rows of 1024 tokens; lengths log-normal (median ~90, clipped to 4..2000)."""
    rng = random.Random(0)
    store = store_of([int(min(2000, max(4, rng.lognormvariate(4.5, 1.2)))) for _ in range(1500)])
    n_ranks, batch, seq = 4, 32, 1024
    run = BalancedLoader(store, seq, batch, MICRO, COEFS, 0, n_ranks, [0])
    full = []
    while run.epoch == 0:
        run.next_step()
        # A full step: the pool was topped up to its lookahead (the epoch's last steps drain it).
        if run.stream.cursor < store.n_docs:
            full.append(run.step_stats())
    assert len(full) >= 5
    assert max(s.imbalance for s in full) <= 1.05
    assert max(s.padding for s in full) <= 0.01
    windows = PackedWindows(store, seq)
    packed = StepLoader(windows, StepSampler(len(windows), batch, 0, n_ranks, 0), MICRO, COEFS)
    packed_imbalance = []
    for _ in range(len(full)):
        packed.next_step()
        packed_imbalance.append(packed.step_stats().imbalance)
    assert np.mean(packed_imbalance) > np.mean([s.imbalance for s in full]) + 0.03


def test_errors(corpus):
    with pytest.raises(DataError, match="fewer than one step's train.global_batch x train.seq_len = 8192"):
        BalancedLoader(corpus, 1024, BATCH, MICRO, COEFS, 0, 2, [0])
    with pytest.raises(ValueError, match="no step was taken yet"):
        loader(corpus, [0]).step_stats()
