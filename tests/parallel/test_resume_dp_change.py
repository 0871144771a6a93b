"""A run stopped mid-epoch on 4 ranks and resumed on 2, with half the global batch, consumes
every document of the epoch exactly once, for packed windows and for balanced batching: the
data position a checkpoint keeps is global (windows or documents consumed), not a count of
steps of one rank or one global batch."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch.distributed as dist

from plait.data import prepare_data
from plait.data.balanced_loader import BalancedLoader
from plait.data.packing import PackedWindows
from plait.launch import spawn
from plait.train.trainer import run_training
from tests.parallel.harness import job, write_corpus

STOP = 3  # steps on 4 ranks, then a checkpoint
BATCHING = ("packed", "balanced")
FIRST_BATCH, SECOND_BATCH = 8, 4  # global batch before and after the resume


def _values(batching: str, steps: int, resume: bool) -> dict:
    return {"data.batching": batching, "train.steps": steps, "checkpoint.every": STOP, "checkpoint.resume": resume,
            "train.global_batch": SECOND_BATCH if resume else FIRST_BATCH, "train.micro_batch": 2, "train.seq_len": 128, "train.eval_every": 0,
            "model.n_layers": 2, "data.val_fraction": 0.0}


def read_while_training(workdir: str, steps: dict[str, int], resume: bool) -> dict[str, list]:
    """Inside a spawned rank: train each batching for ``steps[batching]`` steps (resuming when
    asked), recording what this rank reads: window indices, or balanced (doc, start, length)
    pieces."""
    read: list = []
    window_get, row = PackedWindows.__getitem__, BalancedLoader._row

    def record_window(self, i):
        read.append(int(i))
        return window_get(self, i)

    def record_row(self, pieces):
        read.extend(tuple(int(x) for x in p) for p in pieces)
        return row(self, pieces)

    PackedWindows.__getitem__, BalancedLoader._row = record_window, record_row
    out = {}
    try:
        for batching in BATCHING:
            read.clear()
            cfg = job(workdir, f"dp_change_{batching}",
                      **{"parallel.nproc": dist.get_world_size(), **_values(batching, steps[batching], resume)})
            run_training(cfg)
            out[batching] = list(read)
    finally:
        PackedWindows.__getitem__, BalancedLoader._row = window_get, row
    return out


def _epoch_ends(workdir: str) -> dict[str, int]:
    """The step at which each batching's first epoch ends when STOP steps of FIRST_BATCH on 4
    ranks are followed by SECOND_BATCH steps on 2 (balanced: found by running the stream)."""
    first, second = (job(workdir, "probe", **_values("balanced", 1, resume)) for resume in (False, True))
    data = prepare_data(first.data, first.train.seq_len, first.train.seed)
    packed = STOP + (len(data.train) - STOP * FIRST_BATCH) // SECOND_BATCH
    loader = BalancedLoader.for_job(first, data.train.store, n_ranks=4, ranks=range(4))
    for _ in range(STOP):
        loader.next_step()
    state = loader.state_dict()
    loader = BalancedLoader.for_job(second, data.train.store, n_ranks=2, ranks=[0, 1])
    loader.load_state_dict(state)
    steps = STOP
    while loader.epoch == 0:
        loader.next_step()
        steps += 1
    return {"packed": packed, "balanced": steps - 1}  # the last call began epoch 1


def test_resume_on_fewer_ranks_reads_each_document_once(tmp_path) -> None:
    workdir = str(tmp_path)
    write_corpus(workdir, n_docs=30)  # a short epoch: about 7 steps
    ends = _epoch_ends(workdir)
    assert STOP + 2 < min(ends.values()) < 40  # the stop is mid-epoch; the epoch is short
    first = spawn(read_while_training, 4, (workdir, {b: STOP for b in BATCHING}, False))
    second = spawn(read_while_training, 2, (workdir, ends, True))

    cfg = job(workdir, "probe", **_values("packed", 1, False))
    data = prepare_data(cfg.data, cfg.train.seq_len, cfg.train.seed)
    windows = [i for rank in first + second for i in rank["packed"]]
    assert Counter(windows).most_common(1)[0][1] == 1  # no window twice
    assert len(windows) == STOP * FIRST_BATCH + (ends["packed"] - STOP) * SECOND_BATCH  # none skipped
    assert set(windows) == set(np.random.default_rng(cfg.train.seed).permutation(len(data.train))[: len(windows)].tolist())

    tokens = Counter()
    for rank in first + second:
        for doc, start, length in rank["balanced"]:
            tokens.update((doc, t) for t in range(start, start + length))
    assert max(tokens.values()) == 1  # no token of any document read twice
    lengths = np.diff(data.train.store.offsets)
    assert sum(tokens.values()) == int(lengths.sum())  # and every token of every document once
    assert set(tokens) == {(doc, t) for doc, n in enumerate(lengths.tolist()) for t in range(n)}


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
