"""Memory options on one process, without the trainer: host AdamW, activation offload, token-wise
recompute (with the saved-activation meter that measures them), the micro-batch search, and the
memory breakdown. Multi-rank parity of the same options is in tests/parallel/test_parity.py."""

from __future__ import annotations

import math
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from plait.config import ModelConfig
from plait.models.llama import Llama
from plait.parallel.activation_offload import apply_activation_offload, offloaded_indices
from plait.parallel.recompute import apply_activation_checkpointing
from plait.parallel.token_recompute import apply_tokenwise_recompute, recomputed_tokens
from plait.telemetry.saved_activations import SavedActivations
from plait.train import memory_report, micro_batch
from plait.train.host_optimizer import HostOffloadAdamW

LAYERS, SEQ = 4, 64


def model(**memory) -> Llama:
    torch.manual_seed(0)
    net = Llama(ModelConfig(dim=64, n_layers=LAYERS, n_heads=4, n_kv_heads=2, ffn_dim=160, vocab_size=97,
                            max_seq_len=SEQ))
    net.init_weights(0)
    apply_activation_checkpointing(net, memory.get("ac", "none"))
    apply_tokenwise_recompute(net, memory.get("fraction", 0.0))
    net.activation_offload = apply_activation_offload(net, memory.get("offload", 0), LAYERS, torch.device("cpu"))
    return net


def step(net: Llama) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, gradients, and the peak bytes kept for backward on the device."""
    ids = torch.randint(0, 97, (3, SEQ), generator=torch.Generator().manual_seed(1))
    meter = SavedActivations()
    with meter:
        logits = net(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in net.named_parameters()}, meter.peak


@pytest.fixture(scope="module")
def plain():
    return step(model())


def test_activation_offload_moves_every_saved_activation_and_changes_nothing(plain):
    loss, grads, kept = plain
    net = model(offload=-1)
    got_loss, got_grads, got_kept = step(net)
    assert got_loss == loss and all(torch.equal(got_grads[n], grads[n]) for n in grads)
    assert got_kept <= 0.1 * kept  # at least 90% less kept on the device (cos/sin stay: shared)
    assert net.activation_offload.ledger.host_peak >= 0.85 * kept
    # Everything went back: autograd freed the graph, the stashes with it.
    assert net.activation_offload.ledger.host_now == 0


def test_activation_offload_of_checkpointed_blocks_moves_their_inputs(plain):
    loss, grads, _ = plain
    base = step(model(ac="full"))
    net = model(ac="full", offload=2)
    got_loss, got_grads, got_kept = step(net)
    assert got_loss == loss and all(torch.allclose(got_grads[n], grads[n], rtol=1e-5, atol=1e-7) for n in grads)
    assert 0 < got_kept < base[2]  # the first two blocks' inputs left the device
    assert net.activation_offload.ledger.offloaded > 0


def test_offloaded_blocks_are_the_first_ones():
    assert offloaded_indices(2, 4) == [0, 1]
    assert offloaded_indices(-1, 3) == [0, 1, 2]
    assert offloaded_indices(9, 3) == [0, 1, 2]


def test_tokenwise_recompute_is_exact_and_between_none_and_full(plain):
    loss, grads, kept = plain
    full = step(model(ac="full"))[2]
    peaks = []
    for fraction in (0.25, 0.5, 0.75):
        got_loss, got_grads, got_kept = step(model(fraction=fraction))
        assert math.isclose(got_loss, loss, rel_tol=1e-6)
        for name in grads:
            assert torch.allclose(got_grads[name], grads[name], rtol=1e-5, atol=1e-7), (fraction, name)
        peaks.append(got_kept)
    assert kept > peaks[0] > peaks[1] > peaks[2] > full


def test_recomputed_tokens_round_and_stay_in_range():
    assert recomputed_tokens(64, 0.25) == 16
    assert recomputed_tokens(10, 1.0) == 10 and recomputed_tokens(10, 0.0) == 0
    with pytest.raises(ValueError, match="recompute_fraction"):
        apply_tokenwise_recompute(model(), 1.5)


def test_host_adamw_steps_like_adamw_and_keeps_its_state_on_the_host():
    torch.manual_seed(0)
    nets = [torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [torch.optim.AdamW(nets[0].parameters(), lr=1e-2, weight_decay=0.1),
            HostOffloadAdamW(nets[1].parameters(), lr=1e-2, weight_decay=0.1)]
    for _ in range(3):
        x = torch.randn(4, 8)
        for net, opt in zip(nets, opts):
            net(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))
    state = opts[1].state[nets[1].weight]
    assert state["exp_avg"].device.type == "cpu" and state["exp_avg"] is not nets[1].weight
    again = HostOffloadAdamW(nets[1].parameters(), lr=1e-2)
    again.load_state_dict(opts[1].state_dict())
    assert torch.equal(again.state[nets[1].weight]["exp_avg_sq"], state["exp_avg_sq"])


@settings(max_examples=60, deadline=None)
@given(per_rank=st.integers(1, 96), threshold=st.integers(0, 100))
def test_micro_batch_search_finds_the_largest_that_fits(per_rank, threshold):
    options = micro_batch.candidates(per_rank)
    assert all(per_rank % m == 0 for m in options) and options == sorted(options)

    def attempt(m: int) -> micro_batch.Try:
        if m > threshold:  # a failed try: the search carries on
            return micro_batch.Try(m, math.inf, False)
        return micro_batch.Try(m, float(m), True)

    chosen, tries = micro_batch.search(options, attempt)
    fitting = [m for m in options if m <= threshold]
    assert chosen == (fitting[-1] if fitting else None)
    assert len(tries) <= 2 * math.ceil(math.log2(len(options) + 1)) + 1


def test_a_try_that_runs_out_of_memory_is_a_miss(monkeypatch):
    net = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(net.parameters())
    optimizer.state[net.weight]["step"] = torch.zeros(())
    trainer = types.SimpleNamespace(device=torch.device("cpu"), parts=[net], optimizer=optimizer,
                                    cfg=types.SimpleNamespace(memory=types.SimpleNamespace(offload="none")))

    def fails(*_):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(micro_batch, "_step", fails)
    assert micro_batch._measured(trainer, {}) == (math.inf, True)
    assert not optimizer.state  # the try's leftovers are dropped


def test_breakdown_puts_offloaded_state_in_host_memory(tmp_path):
    net = torch.nn.Linear(16, 16)
    optimizer = torch.optim.AdamW(net.parameters())
    net(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    held = memory_report.state_bytes([net], optimizer)
    for offload, host in (("none", set()), ("optimizer", {"optimizer"}), ("params", {"params", "grads", "optimizer"})):
        located = memory_report.located_state([net], optimizer, offload)
        for kind, total in held.items():
            assert located["host" if kind in host else "device"][kind] == total
            assert located["device" if kind in host else "host"][kind] == 0
    row = memory_report.measure([net], optimizer, torch.device("cpu"), "optimizer", saved_activations=1000)
    parts = memory_report.breakdown(row, torch.device("cpu"))
    assert parts["host"]["optimizer"] == held["optimizer"] and parts["device"]["optimizer"] == 0
    assert parts["device"]["activations"] == 1000 and parts["device"]["rest"] >= 0
    path = tmp_path / "memory.png"
    assert memory_report.plot_breakdown([row, row], torch.device("cpu"), str(path), "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
