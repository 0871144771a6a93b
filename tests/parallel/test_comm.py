"""Counted collectives: what plait.telemetry.collectives records against what the theory says.

One spawn of 2 ranks and one of 4 run every check (spawning costs seconds); the ranks return
what they measured and the asserts run here, so a failure names the case and both numbers.
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

D = 16  # every size below divides by 4 ranks, so FSDP2 shards have no padding
F32 = 4
TOL = 0.02  # ratio of measured to theoretical bytes must lie in [1 - TOL, 1 + TOL]


def _mine() -> list[tuple]:
    """(op, dim, bytes, wire_bytes, group_size) of every record since the last reset."""
    return [(r.op, r.dim, r.bytes, r.wire_bytes, r.group_size) for r in comm.records()]


def _raw(group, dim: str) -> dict:
    """Each torch.distributed entry point once on ``group``; returns got/want record tuples."""
    n, me = dist.get_world_size(group), dist.get_rank(group)
    t = torch.ones(D)
    size = D * F32
    comm.reset()
    dist.all_reduce(t, group=group)
    dist.all_gather_into_tensor(torch.empty(n * D), t, group=group)
    dist.reduce_scatter_tensor(torch.empty(D), torch.ones(n * D), group=group)
    dist.all_gather([torch.empty(D) for _ in range(n)], t, group=group)
    dist.broadcast(t, group_src=0, group=group)
    # Uneven all_to_all: rank i sends i + j + 1 rows of 4 floats to rank j.
    splits = [me + j + 1 for j in range(n)]
    dist.all_to_all_single(torch.empty(sum(splits), 4), torch.ones(sum(splits), 4), splits, splits, group=group)
    if me == 0:
        dist.send(t, group_dst=1, group=group)
    elif me == 1:
        dist.recv(t, group_src=1 - me, group=group)
    ops = [dist.P2POp(dist.isend, t, group_peer=(me + 1) % n, group=group),
           dist.P2POp(dist.irecv, torch.empty(D), group_peer=(me - 1) % n, group=group)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    work = dist.all_reduce(t, group=group, async_op=True)
    time.sleep(0.05)  # the record's end must come from wait(), not from the issuing call
    work.wait()
    dist.barrier(group=group)
    k = n - 1
    rows = sum(splits) * 4 * F32
    want = [
        ("all_reduce", dim, size, 2 * k * size // n, n),
        ("all_gather", dim, n * size, k * size, n),
        ("reduce_scatter", dim, n * size, k * size, n),
        ("all_gather", dim, n * size, k * size, n),
        ("broadcast", dim, size, k * size // n, n),
        ("all_to_all", dim, rows, rows - splits[me] * 4 * F32, n),
    ]
    want += [("send", dim, size, size, n)] if me == 0 else [("recv", dim, size, 0, n)] if me == 1 else []
    want += [("send", dim, size, size, n), ("recv", dim, size, 0, n),
             ("all_reduce", dim, size, 2 * k * size // n, n), ("barrier", dim, 0, 0, n)]
    recs = comm.records()
    return {
        "got": _mine(), "want": want,
        "ordered": all(r.start <= r.end for r in recs) and [r.seq for r in recs] == sorted(r.seq for r in recs),
        "async_waited": recs[-2].end - recs[-2].start >= 0.04,
    }


def _train_step(model, x) -> None:
    model(x).square().mean().backward()
    for p in model.parameters():
        p.grad = None


def _measured(model, x, dim: str) -> tuple[int, int]:
    """Wire bytes on ``dim`` in the second step (the first builds buckets and shapes), and Ψ."""
    _train_step(model, x)
    comm.reset()
    _train_step(model, x)
    wire = sum(r.wire_bytes for r in comm.records() if r.dim == dim)
    return wire, sum(p.numel() for p in model.parameters())


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 2 * D), nn.ReLU(), nn.Linear(2 * D, D))


def _ddp(n: int) -> tuple[float, float]:
    """Measured / theoretical bytes, and how far the gradients are from the plain average:
    the counting comm hook must not change what DDP computes."""
    from torch.distributed._composable.replicate import replicate
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (n,), mesh_dim_names=("dp_replicate",))
    comm.register_mesh(mesh)
    model = replicate(_mlp(), device_mesh=mesh)
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(dist.get_rank()))
    wire, psi = _measured(model, x, "dp_replicate")
    model(x).square().mean().backward()
    reference = _mlp()
    reference(x).square().mean().backward()
    gap = 0.0
    with comm.paused():
        for got, want in zip(model.parameters(), reference.parameters()):
            dist.all_reduce(want.grad)
            gap = max(gap, (got.grad - want.grad / n).abs().max().item())
    return wire / (2 * (n - 1) / n * psi * F32), gap


def _fsdp(n: int) -> float:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (n,), mesh_dim_names=("dp_shard",))
    comm.register_mesh(mesh)
    model = _mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    wire, psi = _measured(model, torch.randn(8, D), "dp_shard")
    # parameters() are DTensors; their numel() is the full (unsharded) size, so psi is Ψ
    return wire / (3 * (n - 1) / n * psi * F32)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        return self.w2(torch.relu(self.w1(x)))


def _tp(mesh) -> dict:
    """One Colwise + Rowwise block: an all-reduce of the activations forward, one of the
    input gradient backward, both batch x seq x dim fp32 on the tp dim."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    block = parallelize_module(_Block(), mesh["tp"], {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
    x = torch.randn(2, 3, D, requires_grad=True)
    comm.reset()
    out = block(x)
    forward = _mine()
    comm.reset()
    out.sum().backward()
    return {"forward": forward, "backward": _mine(), "act": 2 * 3 * D * F32}


def _pp(m: int) -> dict:
    """A 2-stage GPipe with ``m`` micro-batches: one send per micro-batch of its activations
    forward and of their gradient backward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    comm.register_mesh(mesh)
    me = dist.get_rank()
    torch.manual_seed(me)
    stage = PipelineStage(nn.Linear(D, D), me, 2, torch.device("cpu"), group=mesh.get_group())
    schedule = ScheduleGPipe(stage, n_microbatches=m, loss_fn=lambda out, tgt: (out - tgt).square().mean())
    x, y = torch.randn(m * 2, 3, D), torch.randn(m * 2, 3, D)
    for step in range(2):  # the first step infers shapes with extra messages
        comm.reset()
        schedule.step(x) if me == 0 else schedule.step(target=y, losses=[])
    return {"got": _mine(), "act": 2 * 3 * D * F32}


def _in_flight() -> dict:
    """A rank blocked in a collective shows it in in_flight()."""
    seen = []
    if dist.get_rank() == 0:
        probe = threading.Timer(0.2, lambda: seen.extend((r.op, r.dim) for r in comm.in_flight()))
        probe.start()
        dist.all_reduce(torch.ones(4))
        probe.join()
    else:
        time.sleep(0.5)
        dist.all_reduce(torch.ones(4))
    return {"seen": seen, "after": [(r.op, r.dim) for r in comm.in_flight()]}


def _summary() -> dict:
    comm.reset()
    dist.all_reduce(torch.ones(D))
    with comm.paused():
        dist.all_reduce(torch.ones(1000))  # bookkeeping: not counted
    dist.broadcast(torch.ones(2 * D), src=0)
    first = comm.step_summary()
    return {"first": first, "second": comm.step_summary(reset=False)}


def _forget_own() -> dict:
    """A step starts (``forget_own``) while a background thread's exchange is in flight: the
    step forgets its own traffic since the last step, not the exchange, whose emulated wait
    (0.3 s of latency) is still held when the thread waits."""
    side = dist.new_group()
    comm.register_group(side, "dp_replicate")
    comm.configure_emulation({}, {"dp_replicate": 0.3})
    comm.reset()
    issued, started = threading.Event(), threading.Event()
    held = []

    def exchange() -> None:
        work = dist.all_reduce(torch.ones(2 * D), group=side, async_op=True)
        issued.set()
        started.wait()
        begin = time.perf_counter()
        work.wait()
        held.append(time.perf_counter() - begin)

    thread = threading.Thread(target=exchange)
    thread.start()
    issued.wait()
    dist.all_reduce(torch.ones(D))  # this thread's traffic between steps (validation)
    comm.forget_own()
    started.set()
    thread.join()
    comm.configure_emulation({}, {})
    return {"kept": [(r.op, r.dim, r.bytes) for r in comm.records()], "held": held[0]}


def _checks(n: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    comm.install()
    comm.install()  # idempotent: counted once
    out = {"n": n, "ddp": _ddp(n), "fsdp": _fsdp(n)}
    if n == 2:
        out["pp"] = _pp(3)
        comm.register_group(dist.group.WORLD, "world")  # the 1-D meshes above reused it
        out["raw"] = [_raw(None, "world")]
        out["in_flight"] = _in_flight()
        out["summary"] = _summary()
        out["forget_own"] = _forget_own()
    else:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        comm.register_mesh(mesh)
        out["raw"] = [_raw(mesh.get_group("tp"), "tp"), _raw(mesh.get_group("dp"), "dp")]
        out["tp"] = _tp(mesh)
    comm.uninstall()
    comm.reset()
    dist.all_reduce(torch.ones(2))
    out["after_uninstall"] = len(comm.records())
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def ranks(request):
    return spawn(_checks, request.param, (request.param,))


def test_raw_collectives_recorded(ranks):
    for rank, out in enumerate(ranks):
        for case in out["raw"]:
            assert case["got"] == case["want"], f"rank {rank}"
            assert case["ordered"], f"rank {rank}: start > end or seq out of order"
            assert case["async_waited"], f"rank {rank}: async end not taken at wait()"


def test_ddp_bytes_match_ring_all_reduce(ranks):
    for rank, out in enumerate(ranks):
        ratio, gap = out["ddp"]
        assert 1 - TOL <= ratio <= 1 + TOL, f"rank {rank} n={out['n']}: DDP measured/theory = {ratio:.4f}"
        assert gap <= 1e-6, f"rank {rank}: the counting hook changed DDP's gradients by {gap}"


def test_fsdp_bytes_are_one_and_a_half_ddp(ranks):
    for rank, out in enumerate(ranks):
        assert 1 - TOL <= out["fsdp"] <= 1 + TOL, f"rank {rank} n={out['n']}: FSDP measured/theory = {out['fsdp']:.4f}"


def test_tp_all_reduces_activations_once_each_way(ranks):
    if ranks[0]["n"] != 4:
        pytest.skip("TP runs on the 2x2 mesh")
    for rank, out in enumerate(ranks):
        act = out["tp"]["act"]
        want = [("all_reduce", "tp", act, act, 2)]  # 2(n-1)/n = 1 for n = 2
        assert out["tp"]["forward"] == want, f"rank {rank} forward"
        assert out["tp"]["backward"] == want, f"rank {rank} backward"


def test_pp_sends_one_activation_per_micro_batch(ranks):
    if ranks[0]["n"] != 2:
        pytest.skip("PP runs on 2 ranks")
    act = ranks[0]["pp"]["act"]
    sends = [("send", "pp", act, act, 2)] * 3
    recvs = [("recv", "pp", act, 0, 2)] * 3
    assert sorted(ranks[0]["pp"]["got"]) == sorted(sends + recvs)  # activations out, gradients in
    assert sorted(ranks[1]["pp"]["got"]) == sorted(recvs + sends)  # activations in, gradients out


def test_uninstall_stops_counting(ranks):
    assert all(out["after_uninstall"] == 0 for out in ranks)


def test_in_flight_shows_the_blocking_collective(ranks):
    if ranks[0]["n"] != 2:
        pytest.skip("runs on 2 ranks")
    assert ranks[0]["in_flight"]["seen"] == [("all_reduce", "world")]
    assert ranks[0]["in_flight"]["after"] == []


def test_step_summary_aggregates_and_resets(ranks):
    if ranks[0]["n"] != 2:
        pytest.skip("runs on 2 ranks")
    for rank, out in enumerate(ranks):
        first = out["summary"]["first"]
        assert first["comm_count"] == 2
        assert first["comm_payload_bytes"] == {"world": 3 * D * F32}
        assert first["comm_bytes"] == {"world": D * F32 + D * F32}  # 2(n-1)/n·64 + (n-1)/n·128
        assert first["comm_op_bytes"] == {"world/all_reduce": D * F32, "world/broadcast": D * F32}
        assert first["comm_s"] > 0
        assert first["comm_dim_s"] == {"world": pytest.approx(first["comm_s"])}
        assert out["summary"]["second"] == {"comm_bytes": {}, "comm_payload_bytes": {}, "comm_op_bytes": {},
                                            "comm_s": 0.0, "comm_dim_s": {}, "comm_count": 0}


def test_a_step_start_keeps_a_background_exchange(ranks):
    if ranks[0]["n"] != 2:
        pytest.skip("runs on 2 ranks")
    for rank, out in enumerate(ranks):
        assert out["forget_own"]["kept"] == [("all_reduce", "dp_replicate", 2 * D * F32)], f"rank {rank}"
        assert out["forget_own"]["held"] >= 0.25, f"rank {rank}: the emulated latency was skipped"
