"""Slow-link emulation in the counted collectives: held to the emulated time, never less,
overlap kept, bookkeeping not held.

The link model is checked exactly on records alone; one spawn of 2 gloo ranks checks the
wall-clock effect. Timing bounds are tight below (the hold guarantees them) and loose above.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from plait.launch import spawn
from plait.telemetry import collectives as comm

FLOATS = 50_000  # 200 kB payload; an all_reduce over 2 ranks sends all of it (2(n-1)/n = 1)
RATE = 5e5  # bytes/s on the emulated dim: 0.4 s for the payload
LATENCY = 0.05
EMULATED = FLOATS * 4 / RATE + LATENCY
SLACK = 1.0  # upper bounds: a loaded 2-core machine may add this much


def _done(op: str, dim: str, nbytes: int, wire: int, start: float) -> float:
    """The emulated deadline of a fresh record (booking its link)."""
    return comm._deadline(comm.Record(0, op, dim, nbytes, wire, 2, start), *comm._emulation)


def test_link_model_queues_transfers_per_dim_and_direction():
    comm.configure_emulation({"*": 100.0, "tp": 1000.0}, {"pp": 0.5})
    try:
        assert _done("all_reduce", "dp", 100, 200, 10.0) == pytest.approx(12.0)
        assert _done("all_reduce", "dp", 100, 200, 10.0) == pytest.approx(14.0)  # queued behind the first
        assert _done("all_reduce", "dp", 100, 100, 20.0) == pytest.approx(21.0)  # the link was free again
        assert _done("recv", "pp", 300, 0, 10.0) == pytest.approx(13.5)  # its payload, plus latency
        assert _done("send", "pp", 300, 300, 10.0) == pytest.approx(13.5)  # the other direction: not queued
        assert _done("all_reduce", "tp", 0, 500, 10.0) == pytest.approx(10.5)  # its own rate
        comm.configure_emulation({"dp": 100.0}, {})
        assert _done("all_reduce", "tp", 0, 500, 10.0) == 0.0  # not emulated
    finally:
        comm.configure_emulation({}, {})
    assert comm._emulation is None


def test_paused_is_per_thread():
    seen = []
    with comm.paused():
        thread = threading.Thread(target=lambda: seen.append(comm._pause.depth))
        thread.start()
        thread.join()
        assert comm._pause.depth == 1
    assert seen == [0] and comm._pause.depth == 0


def _timed(fn) -> tuple[float, comm.Record | None]:
    """(wall seconds of ``fn()``, the last record it left), both ranks starting together."""
    with comm.paused():
        dist.barrier()
    comm.reset()
    begin = time.perf_counter()
    fn()
    wall = time.perf_counter() - begin
    recs = comm.records()
    return wall, recs[-1] if recs else None


def _checks() -> dict:
    torch.set_num_threads(1)
    comm.install()
    comm.register_group(dist.group.WORLD, "dp_replicate")
    fast = dist.new_group([0, 1])
    comm.register_group(fast, "tp")
    comm.configure_emulation({"dp_replicate": RATE}, {"dp_replicate": LATENCY})
    x = torch.ones(FLOATS)
    dist.all_reduce(x, group=fast)  # the gloo connections are made before anything is timed
    out = {}
    wall, rec = _timed(lambda: dist.all_reduce(x))
    out["sync"] = (wall, rec.end - rec.start, rec.wire_bytes)
    wall, rec = _timed(lambda: dist.all_reduce(x, group=fast))
    out["other_dim"] = (wall, rec.deadline)

    def overlapped():
        work = dist.all_reduce(x, async_op=True)
        time.sleep(EMULATED)  # compute while the link works
        begin = time.perf_counter()
        work.wait()
        out["async_wait"] = time.perf_counter() - begin

    wall, rec = _timed(overlapped)
    out["async"] = (wall, rec.end - rec.start)

    def paused():
        with comm.paused():
            dist.all_reduce(x)

    out["paused"] = _timed(paused)[0], len(comm.records())
    # DDP's buckets: held at the end of backward, gradients unchanged.
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(FLOATS // 100, 100, bias=False))
    data = torch.randn(4, FLOATS // 100, generator=torch.Generator().manual_seed(dist.get_rank()))
    model(data).square().sum().backward()  # DDP's first step (bucket rebuild) untimed
    model.zero_grad()
    loss = model(data).square().sum()
    wall, rec = _timed(loss.backward)
    grad = model.module.weight.grad.clone()
    with comm.paused():
        dist.all_reduce(grad)
    out["ddp"] = (wall, rec.op, rec.end - rec.start, (model.module.weight.grad - grad / 2).abs().max().item())
    comm.configure_emulation({}, {})
    wall, rec = _timed(lambda: dist.all_reduce(x))
    out["off"] = (wall, rec.deadline)
    comm.uninstall()
    return out


@pytest.fixture(scope="module")
def ranks():
    return spawn(_checks, 2)


def test_sync_collective_takes_the_emulated_time(ranks):
    for rank, out in enumerate(ranks):
        wall, comm_s, wire = out["sync"]
        assert wire == FLOATS * 4
        assert EMULATED <= wall < EMULATED + SLACK, f"rank {rank}: {wall:.3f} s, emulated {EMULATED:.3f} s"
        assert EMULATED <= comm_s <= wall, f"rank {rank}: comm_s {comm_s:.3f}"


def test_other_dims_and_bookkeeping_not_slowed(ranks):
    for rank, out in enumerate(ranks):
        for case in ("other_dim", "off"):  # a dim not emulated; emulation turned off
            wall, deadline = out[case]
            assert deadline == 0.0 and wall < EMULATED / 2, f"rank {rank} {case}: {wall:.3f} s"
        wall, counted = out["paused"]
        assert counted == 0 and wall < EMULATED / 2, f"rank {rank}: paused took {wall:.3f} s"


def test_async_collective_overlaps_compute(ranks):
    for rank, out in enumerate(ranks):
        wall, comm_s = out["async"]
        assert comm_s >= EMULATED and wall >= EMULATED
        waited = out["async_wait"]
        assert waited < EMULATED / 2, f"rank {rank}: wait() added {waited:.3f} s after the compute"


def test_ddp_buckets_held_at_end_of_backward(ranks):
    for rank, out in enumerate(ranks):
        wall, op, comm_s, gap = out["ddp"]
        assert op == "all_reduce" and gap <= 1e-5, f"rank {rank}: gradients off by {gap}"
        # The bucket holds the (FLOATS // 100) x 100 weight gradient: the same bytes as above.
        assert EMULATED <= comm_s <= wall < EMULATED + SLACK, f"rank {rank}: backward {wall:.3f} s"
