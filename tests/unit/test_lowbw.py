"""DiLoCo-family pieces in one process: the outer optimizer by hand, fragments, the streaming
schedule, config checks, and DiLoCo with one worker against plain training."""

from __future__ import annotations

import pytest
import torch

from plait.config import LowBWConfig, build_config
from plait.errors import ConfigError
from plait.lowbw.diloco import OuterLoop
from plait.lowbw.fragments import block_index, split_fragments
from plait.lowbw.outer import outer_step, staleness_scales
from plait.models.llama import build_model
from plait.train.trainer import run_training
from tests.parallel.harness import job, write_corpus


def test_outer_nesterov_step_by_hand():
    g0, grads = torch.tensor([1.0, -2.0, 0.5]), [torch.tensor([0.1, 0.2, -0.3]), torch.tensor([0.05, -0.1, 0.2])]
    w, b = g0.clone(), torch.zeros(3)
    lr, mu = 0.7, 0.9
    expected, buf = g0.clone(), torch.zeros(3)
    for grad in grads:
        outer_step(w, b, grad, lr, mu, nesterov=True)
        buf = mu * buf + grad
        expected = expected - lr * (grad + mu * buf)
    assert torch.allclose(w, expected, rtol=0, atol=1e-7) and torch.allclose(b, buf)
    plain, pb = g0.clone(), torch.zeros(3)
    outer_step(plain, pb, grads[0], lr, mu, nesterov=False)
    assert torch.allclose(plain, g0 - lr * grads[0])  # first heavy-ball step: b = g
    sgd, sb = g0.clone(), torch.zeros(3)
    outer_step(sgd, sb, grads[0], 1.0, 0.0, nesterov=True)
    assert torch.equal(sgd, g0 - grads[0]) and torch.equal(sb, torch.zeros(3))


def test_momentum_clipping_caps_the_norm_and_changes_the_step():
    grad = torch.tensor([3.0, 4.0])  # norm 5
    free_w, free_b = torch.zeros(2), torch.zeros(2)
    outer_step(free_w, free_b, grad, 1.0, 0.9, nesterov=False)
    clip_w, clip_b = torch.zeros(2), torch.zeros(2)
    outer_step(clip_w, clip_b, grad, 1.0, 0.9, nesterov=False, clip=1.0)
    assert clip_b.norm() == pytest.approx(1.0) and free_b.norm() == pytest.approx(5.0)
    assert torch.allclose(clip_w, -grad / 5)
    # the norm is the worker's: other ranks' share enters through total_sq
    w, b = torch.zeros(2), torch.zeros(2)
    outer_step(w, b, grad, 1.0, 0.9, nesterov=False, clip=10.0, total_sq=lambda x: x + 200.0)
    assert b.norm() == pytest.approx(5.0 * 10.0 / 15.0)


def test_staleness_penalty_scales_each_tensor_by_its_gap():
    stale = torch.tensor([3.0, 4.0, 1.0])
    gap = torch.tensor([0.0, 5.0, 0.0])  # tensor 1 (two elements, |g| = 5) moved by 5
    scales = staleness_scales(stale, gap, [2, 1], penalty=0.5)
    assert torch.allclose(scales, torch.tensor([1 / 1.5, 1 / 1.5, 1.0]))
    assert torch.equal(staleness_scales(stale, gap, [2, 1], 0.0), torch.ones(3))


def tiny_model(n_layers=4, tie=False):
    cfg = build_config(values={"model.dim": 32, "model.n_layers": n_layers, "model.n_heads": 4, "model.ffn_dim": 64,
                               "model.vocab_size": 50, "model.max_seq_len": 16, "model.tie_embeddings": tie,
                               "train.seq_len": 16, "parallel.nproc": 1})
    return build_model(cfg.model, "cpu", seed=0)


def test_fragments_stride_blocks_and_split_the_rest_evenly():
    model = tiny_model(4)
    frags = split_fragments([model], 2)
    blocks = [{block_index(n) for n in f.names if block_index(n) is not None} for f in frags]
    assert blocks == [{0, 2}, {1, 3}]
    total = sum(p.numel() for p in model.parameters())
    assert sum(f.numel for f in frags) == total
    assert frags[0].numel == frags[1].numel == total // 2  # 4 blocks, 2 fragments: equal halves
    one = split_fragments([model], 1)[0]
    assert one.numel == total
    # write goes into the parameters themselves
    flat = frags[1].read()
    frags[1].write(flat + 1.0)
    assert torch.allclose(split_fragments([model], 2)[1].read(), flat + 1.0)
    assert torch.equal(split_fragments([model], 2)[0].read(), frags[0].read())
    tied = tiny_model(4, tie=True)
    assert sum(f.numel for f in split_fragments([tied], 3)) == sum(p.numel() for p in tied.parameters())


def test_streaming_schedule_staggers_fragments():
    loop = OuterLoop.__new__(OuterLoop)  # only the schedule: no weights, no groups
    loop.cfg = LowBWConfig(method="streaming", inner_steps=8, fragments=4, overlap_steps=1)
    loop.H, loop.count, loop.tau = 8, 4, 1
    launches = {step: loop.launches_at(step) for step in range(1, 17) if loop.launches_at(step)}
    # fragment f is applied at 2(f+1) (+8k): launched tau = 1 step earlier
    assert launches == {1: [0], 3: [1], 5: [2], 7: [3], 9: [0], 11: [1], 13: [2], 15: [3]}
    loop.cfg, loop.H, loop.tau = LowBWConfig(method="co2", inner_steps=4), 4, 0
    assert [s for s in range(1, 13) if loop.launches_at(s)] == [4, 8, 12]


@pytest.mark.parametrize("values, message", [
    ({"lowbw.method": "diloco", "lowbw.inner_steps": 3, "train.steps": 10}, "multiple of lowbw.inner_steps"),
    ({"lowbw.method": "streaming", "lowbw.inner_steps": 10, "lowbw.fragments": 4, "train.steps": 20},
     "must divide lowbw.inner_steps"),
    ({"lowbw.method": "streaming", "lowbw.inner_steps": 8, "lowbw.fragments": 4, "lowbw.overlap_steps": 2,
      "train.steps": 16}, "must be below"),
    ({"resilience.inject": "crash_sync:rank=0:step=2"}, "needs an outer sync"),
])
def test_bad_lowbw_settings_are_rejected(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(values={"parallel.nproc": 1, "model.n_layers": 4, **values})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("lowbw"))
    write_corpus(folder, n_docs=60)
    return folder


def test_one_worker_diloco_with_unit_outer_step_is_plain_training(workdir):
    """H = 1, outer lr 1, no momentum: the new global weights are the local ones. In float32
    global − (global − local) is the local weight exactly unless the step changed its sign or
    more than doubled it (Sterbenz); those few elements differ by one rounding of the outer
    gradient, so the losses agree to 1e-7 relative (observed 2e-8), not bit for bit."""
    common = {"train.steps": 4, "train.eval_every": 0, "model.n_layers": 2}
    plain = run_training(job(workdir, "plain", **common))
    outer = {"lowbw.method": "diloco", "lowbw.inner_steps": 1, "lowbw.outer_lr": 1.0, "lowbw.outer_momentum": 0.0}
    diloco = run_training(job(workdir, "diloco1", **common, **outer))
    for got, want in ((diloco.losses, plain.losses), (diloco.grad_norms, plain.grad_norms),
                      (diloco.val_losses, plain.val_losses)):
        assert got.keys() == want.keys()
        assert all(got[k] == pytest.approx(want[k], rel=1e-7) for k in want)
    assert diloco.losses[1] == plain.losses[1]


@pytest.mark.parametrize("method", ["diloco", "streaming", "co2"])
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_outer_loop_on_cuda_keeps_outer_state_in_cpu_memory(method):
    """Weights and the quantized exchange on the GPU, the outer state in CPU memory."""
    device = torch.device("cuda")
    model = tiny_model(4).to(device)
    cfg = LowBWConfig(method=method, inner_steps=2, fragments=2, quantize="int4", error_feedback=True,
                      outer_momentum=0.0, outer_lr=1.0)
    loop = OuterLoop(cfg, [model], None, None, device)
    start = [g.clone() for g in loop.global_w]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    for step in (1, 2, 3, 4):
        loop.after_step(step)
    loop.finish(4)
    loop.close()
    assert all(g.device.type == "cpu" for g in loop.global_w) and loop.residual[0].device.type == "cuda"
    assert all(p.device.type == "cuda" for p in model.parameters())
    moved = [(g - s).abs().max() for g, s in zip(loop.global_w, start)]
    assert all(0.005 < m < 0.02 for m in moved), moved  # the +0.01 arrived, through int4
    after = split_fragments([model], loop.count)
    assert all(torch.equal(f.read(), g) for f, g in zip(after, loop.global_w)) or method == "streaming"


def test_streaming_mix_keeps_part_of_the_local_fragment():
    """One worker moved every weight by 0.01; outer lr 0.5 moves the global weights by 0.005.
    alpha = 0 replaces the local fragment by the global one; alpha = 0.5 lands halfway."""
    landed = {}
    for mix in (0.0, 0.5):
        model = tiny_model(2)
        cfg = LowBWConfig(method="streaming", inner_steps=2, fragments=2, mix=mix, outer_lr=0.5, outer_momentum=0.0)
        loop = OuterLoop(cfg, [model], None, None, torch.device("cpu"))
        start = loop.global_w[0].clone()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        loop.after_step(1)  # fragment 0 syncs after step 1 (H/P = 1)
        loop.close()
        landed[mix] = split_fragments([model], 2)[0].read() - start
    assert torch.allclose(landed[0.0], torch.full_like(landed[0.0], 0.005), atol=1e-6)
    assert torch.allclose(landed[0.5], torch.full_like(landed[0.5], 0.0075), atol=1e-6)


def test_exchanges_live_where_the_workers_backend_reduces():
    from plait.lowbw.agreement import device_for_backend

    # A CUDA job's default NCCL-only group needs GPU tensors; gloo (alone or beside NCCL) the CPU.
    assert device_for_backend("nccl").type == "cuda"
    assert device_for_backend("gloo").type == "cpu"
    assert device_for_backend("cpu:gloo,cuda:nccl").type == "cpu"
