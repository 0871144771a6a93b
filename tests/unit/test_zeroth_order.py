"""The zeroth-order pieces on plain tensors: shared directions, exact restore order, an unbiased
estimate on a quadratic, unbiased stochastic quantization, and a scale no one sends."""

from __future__ import annotations

import random

import pytest
import torch

from plait.lowbw.zeroth_order import (Piece, SharedScale, dequantize, direction, direction_seed, perturb_,
                                      quantize)


def test_a_direction_is_regenerated_alike_and_differs_by_step_and_sample():
    piece = Piece("layers.0.w", torch.zeros(4, 5), (0, 0))
    seed = direction_seed(7, step=3, sample=0)
    assert torch.equal(direction(piece, seed), direction(piece, seed))
    assert not torch.equal(direction(piece, seed), direction(piece, direction_seed(7, 4, 0)))
    assert not torch.equal(direction(piece, seed), direction(piece, direction_seed(7, 3, 1)))
    assert not torch.equal(direction(piece, seed), direction(Piece("layers.1.w", torch.zeros(4, 5), (0, 0)), seed))


def test_perturb_and_its_inverse_restore_the_weights_on_every_worker_alike():
    """+eps, -2eps, +eps leaves rounding, but the same rounding on every worker: bitwise equal."""
    torch.manual_seed(0)
    workers = [[Piece("w", torch.randn(64, 32), (0, 0)), Piece("b", torch.randn(32), (0,))] for _ in range(1)]
    workers.append([Piece(p.name, p.data.clone(), p.offset) for p in workers[0]])
    for pieces in workers:
        seed = direction_seed(1, 5, 0)
        for scale in (1e-3, -2e-3, 1e-3):
            perturb_(pieces, seed, scale)
    for a, b in zip(*workers):
        assert torch.equal(a.data, b.data)


def test_the_central_difference_estimate_is_unbiased_on_a_quadratic():
    """L(θ) = ½ θᵀAθ + bᵀθ: (L(θ+εz) − L(θ−εz)) / 2ε = ∇L·z exactly, and the mean of (∇L·z) z over
    many shared seeds approaches ∇L."""
    torch.manual_seed(1)
    n = 12
    m = torch.randn(n, n, dtype=torch.float64)
    a, b = m @ m.T / n + torch.eye(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    theta = torch.randn(n, dtype=torch.float64)
    loss = lambda t: float(0.5 * t @ a @ t + b @ t)  # noqa: E731
    true = a @ theta + b
    eps, samples = 1e-3, 6000
    piece = Piece("theta", theta, (0,))
    total = torch.zeros(n, dtype=torch.float64)
    for k in range(samples):
        seed = direction_seed(0, 1, k)
        perturb_([piece], seed, eps)
        plus = loss(theta)
        perturb_([piece], seed, -2 * eps)
        minus = loss(theta)
        perturb_([piece], seed, eps)
        g = (plus - minus) / (2 * eps)
        z = direction(piece, seed).double()
        assert g == pytest.approx(float(true @ z), rel=1e-5, abs=1e-7)  # exact up to float32 z and rounding
        total += g * z
    estimate = total / samples
    # Each coordinate's estimate has standard deviation about |∇L| / sqrt(samples) (z Gaussian).
    sigma = float(true.norm()) / samples ** 0.5
    assert (estimate - true).abs().max() < 5 * sigma, (estimate, true)
    assert torch.nn.functional.cosine_similarity(estimate, true, dim=0) > 0.99


@pytest.mark.parametrize("bits", [1, 2, 8, 16])
def test_stochastic_quantization_is_unbiased_inside_its_range(bits):
    rng = random.Random(bits)
    scale = 0.25 if bits > 1 else 1.0
    qmax = max((1 << (bits - 1)) - 1, 1)
    for value in (0.0, 0.1, -0.37, 0.6 * qmax * scale):
        draws = [dequantize(quantize(value, scale, bits, rng.random()), scale) for _ in range(20000)]
        if bits == 1:
            assert set(draws) <= {-scale, scale}
        assert all(abs(q) <= qmax * scale for q in draws)
        if abs(value) <= qmax * scale:
            assert sum(draws) / len(draws) == pytest.approx(value, abs=4 * scale / len(draws) ** 0.5)  # 4 sigma
    assert quantize(1e9, scale, bits, 0.5) == qmax and quantize(-1e9, scale, bits, 0.5) == -qmax


def test_the_shared_scale_follows_the_agreed_averages_and_survives_a_resume():
    scale = SharedScale(bits=8)
    assert not scale.ready
    scale.observe([3.0, -4.0])  # mean square 12.5
    assert scale.ready and scale.scale == pytest.approx(4 * 12.5 ** 0.5 / 127)
    scale.observe([0.0, 0.0])
    assert scale.mean_square == pytest.approx(0.9 * 12.5)
    copy = SharedScale(bits=8)
    copy.load_state_dict(scale.state_dict())
    assert copy.scale == scale.scale


def test_the_subset_is_the_norms_and_the_output_layer():
    from plait.config import build_config
    from plait.lowbw.zo_step import trained_pieces
    from plait.models.llama import build_model

    cfg = build_config(values={"model.dim": 32, "model.n_layers": 2, "model.n_heads": 4, "model.ffn_dim": 64,
                               "model.vocab_size": 40, "model.max_seq_len": 16, "train.seq_len": 16,
                               "train.micro_batch": 1, "parallel.nproc": 1})
    model = build_model(cfg.model, "cpu", seed=0)
    every = {p.name for p in trained_pieces([model], "all")}
    subset = {p.name for p in trained_pieces([model], "norms_and_output")}
    assert every == {name for name, _ in model.named_parameters()}
    assert subset and subset < every and all("norm" in n or n.startswith("output") for n in subset)
    assert any(n.startswith("output") for n in subset) and any("norm" in n for n in subset)
