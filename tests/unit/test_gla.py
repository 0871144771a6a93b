"""Gated linear attention: its forms agree (recurrent, chunked at several chunk sizes,
generation), documents reset the state, the gates' gradients match finite differences, and the
LASP-2 split (zero-state chunks + carried state) is exact. Parity under cp is in
tests/parallel/test_parity.py; bytes and cp logits in tests/parallel/test_lasp2.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from plait.config import build_config
from plait.errors import ConfigError
from plait.models.gla import GatedLinearAttention
from plait.models.linear_attention import carry_in, chunked, document_resets, piece_decay, recurrent
from plait.models.llama import KVCache, build_model

B, H, S, DK, DV = 2, 3, 77, 8, 6  # 77: no chunk size below divides it


def inputs(dtype=torch.float32, gate_shift: float = 0.0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    q, k, v = rand(B, H, S, DK) * DK ** -0.5, rand(B, H, S, DK), rand(B, H, S, DV)
    g = F.logsigmoid(rand(B, H, S, DK) * 2 + gate_shift) / 4
    return q, k, v, g


def doc_resets() -> torch.Tensor:
    """Row 0: documents starting at 10, 40 and 41 (a one-token document); row 1: at 33."""
    resets = torch.zeros(B, S, dtype=torch.bool)
    resets[0, [10, 40, 41]] = True
    resets[1, 33] = True
    return resets


def close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("docs", [False, True], ids=["one_doc", "documents"])
@pytest.mark.parametrize("chunk", [1, 7, 16, 32, 64, 128])
def test_chunked_equals_recurrent(chunk, docs):
    q, k, v, g = inputs()
    resets = doc_resets() if docs else None
    want_out, want_state = recurrent(q, k, v, g, resets)
    got_out, got_state = chunked(q, k, v, g, resets, chunk)
    close(got_out, want_out)
    close(got_state, want_state)


def test_documents_reset_the_state():
    """A packed row gives each document the output it has alone."""
    q, k, v, g = inputs()
    resets = doc_resets()
    packed, _ = chunked(q, k, v, g, resets, 16)
    for start, stop in ((0, 10), (10, 40), (40, 41), (41, S)):
        alone, _ = recurrent(*(x[:1, :, start:stop] for x in (q, k, v, g)))
        close(packed[:1, :, start:stop], alone)
    unmasked, _ = chunked(q, k, v, g, None, 16)
    assert (unmasked[0, :, 10:] - packed[0, :, 10:]).abs().max() > 1e-3


def test_tiny_gates_stay_finite_and_exact():
    """Gates near 0 (log gates near -100): decay products underflow to 0 and nothing overflows."""
    q, k, v, g = inputs(gate_shift=-100.0)
    g = g * 4
    assert g.min() < -90
    want, _ = recurrent(q, k, v, g, doc_resets())
    got, _ = chunked(q, k, v, g, doc_resets(), 64)
    assert got.isfinite().all()
    close(got, want)


def test_incoming_state_split_is_exact():
    """What LASP-2 relies on: a run from a state S = the run from zero + carry_in(S), and the
    run's final state = D ⊙ S + (its own summary), with and without a reset inside."""
    q, k, v, g = inputs()
    state = torch.randn(B, H, DK, DV, generator=torch.Generator().manual_seed(3))
    for resets in (None, doc_resets()):
        want_out, want_state = recurrent(q, k, v, g, resets, state)
        zero_out, summary = chunked(q, k, v, g, resets, 16)
        close(zero_out + carry_in(q, g, resets, state), want_out)
        close(piece_decay(g, resets)[..., None] * state + summary, want_state)


def test_gate_gradients_match_finite_differences():
    q, k, v, g = inputs(torch.float64)
    small = [x[:1, :1, :21].clone().requires_grad_(x is g) for x in (q, k, v, g)]
    resets = doc_resets()[:1, :21]
    resets[0, 12] = True
    for form in (lambda g_: chunked(small[0], small[1], small[2], g_, resets, 8)[0],
                 lambda g_: recurrent(small[0], small[1], small[2], g_, resets)[0]):
        assert torch.autograd.gradcheck(form, (small[3],), eps=1e-6, atol=1e-7)


def config(**values):
    base = {"model.vocab_size": 97, "model.dim": 48, "model.n_layers": 4, "model.n_heads": 3, "model.ffn_dim": 64,
            "model.attention": "gla", "model.gla_chunk": 16, "train.seq_len": 64, "train.micro_batch": 2,
            "train.global_batch": 2, "parallel.nproc": 1}
    return build_config(values={**base, **values})


def test_layer_gate_parameters_match_finite_differences():
    """The whole layer in fp64: gradients of the low-rank gate projections."""
    cfg = config()
    layer = GatedLinearAttention(cfg.model).double()
    x = torch.randn(1, 20, cfg.model.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    names = ("gate_down.weight", "gate_up.weight", "gate_up.bias")
    params = tuple(dict(layer.named_parameters())[n].detach().clone().requires_grad_(True) for n in names)

    def out(*values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x, None, None, None))

    assert torch.autograd.gradcheck(out, params, eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("pattern", ["", "gs", "ggsg"])
def test_generation_state_equals_full_forward(pattern):
    """Prompt through the chunked form, then one token at a time through the recurrence, each
    GLA layer holding one (heads, d_k, d_v) state: the logits of the whole sequence at once."""
    cfg = config(**{"model.layer_pattern": pattern})
    model = build_model(cfg.model).eval()
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.empty(cfg.model, 1, 40, "cpu", torch.float32)
        steps = [model(ids[:, :21], cache=cache)]
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(21, 40)]
    close(torch.cat(steps, dim=1), full)
    gla_layers = [i for i, m in enumerate(cfg.model.mixers()) if m == "gla"]
    assert sorted(cache.states) == gla_layers
    assert all(cache.keys[i] is None for i in gla_layers)
    dk, dv = cfg.model.gla_dims()
    assert all(s.shape == (1, cfg.model.n_heads, dk, dv) for s in cache.states.values())


def test_pattern_builds_the_named_mixers():
    model = build_model(config(**{"model.layer_pattern": "GGGS", "model.n_layers": 8}).model)
    kinds = [type(block.attention).__name__ for block in model.layers.values()]
    assert kinds == ["GatedLinearAttention"] * 3 + ["Attention"] + ["GatedLinearAttention"] * 3 + ["Attention"]


@pytest.mark.parametrize("pattern", ["ggg", "gx", "sgs"])
def test_bad_patterns_are_refused(pattern):
    with pytest.raises(ConfigError, match="layer_pattern"):
        config(**{"model.layer_pattern": pattern}).model.check_shape()


def test_compiled_chunk_math_equals_eager():
    q, k, v, g = inputs()
    eager, _ = chunked(q, k, v, g, doc_resets(), 32)
    compiled, _ = chunked(q, k, v, g, doc_resets(), 32, compiled=True)
    close(compiled, eager)


def test_document_resets_from_keys():
    keys = torch.tensor([[0, 0, 0, 3, 3, 5]])
    assert document_resets(keys).tolist() == [[False, False, False, True, False, True]]
    assert document_resets(None) is None


# ---- config and layout rules of GLA models

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from plait.layout import Degrees, Workload, layout_problem  # noqa: E402
from plait.models.flops import forward_coefficients, mixer_matmul_params  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="sgSGx ", min_size=1, max_size=9), st.integers(1, 12))
def test_any_pattern_is_accepted_exactly_when_it_tiles_the_layers(pattern, layers):
    cfg = config(**{"model.n_layers": 1}).model
    cfg.n_layers, cfg.layer_pattern = layers, pattern
    text = pattern.strip().lower()
    valid = not text or (set(text) <= {"s", "g"} and layers % len(text) == 0)
    if valid:
        mixers = cfg.mixers()
        assert len(mixers) == layers
        if text:
            assert all(m == ("gla" if text[i % len(text)] == "g" else "softmax") for i, m in enumerate(mixers))
    else:
        with pytest.raises(ConfigError, match="layer_pattern"):
            cfg.mixers()


def work(gla_layers: int, **extra) -> Workload:
    return Workload(n_layers=4, n_heads=4, n_kv_heads=0, ffn_dim=64, seq_len=64, global_batch=8, micro_batch=1,
                    gla_layers=gla_layers, **extra)


def test_cp_modes_follow_the_mixers():
    assert layout_problem(Degrees(world=2, cp=2, cp_mode="auto"), work(4)) is None
    assert layout_problem(Degrees(world=2, cp=2, cp_mode="lasp2"), work(4)) is None
    for mode in ("ring", "ulysses"):
        assert "every layer of this model is GLA" in layout_problem(Degrees(world=2, cp=2, cp_mode=mode), work(4))
    assert "has softmax layers" in layout_problem(Degrees(world=2, cp=2, cp_mode="lasp2"), work(3))
    assert layout_problem(Degrees(world=2, cp=2, cp_mode="ulysses"), work(3)) is None
    assert "gla_gate_rank" in layout_problem(Degrees(world=4, tp=4, zero=3), work(4, gla_gate_rank=6))


def test_cp_shard_auto_follows_the_mixers():
    from plait.config import resolved_cp_shard

    assert resolved_cp_shard(config()) == "contiguous"
    assert resolved_cp_shard(config(**{"model.layer_pattern": "gs"})) == "zigzag"
    assert resolved_cp_shard(config(**{"parallel.cp_shard": "zigzag"})) == "zigzag"


def test_flops_count_the_layers_own_weights():
    """The FLOP model's GLA weights are the layer's matrices (biases and norms left out), and
    GLA layers add nothing quadratic in the document length."""
    cfg = config(**{"model.layer_pattern": "gs"}).model
    layer = GatedLinearAttention(cfg)
    weights = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert mixer_matmul_params(cfg, "gla") == weights
    attn_all_gla, _ = forward_coefficients(config().model)
    attn_hybrid, _ = forward_coefficients(cfg)
    assert attn_all_gla == 0 and attn_hybrid == 2.0 * cfg.dim * 2


def test_plan_and_hf_refuse_gla_in_one_line():
    from plait.checkpoint.hf_mapping import config_to_hf
    from plait.errors import PlaitError
    from plait.plan.spec import refuse_gla

    with pytest.raises(ConfigError, match="GLA layers"):
        refuse_gla(config().model, "plait plan")
    with pytest.raises(PlaitError, match="GLA layers"):
        config_to_hf(config().model)


def test_training_keeps_little_more_than_the_inputs():
    """The per-chunk math is recomputed in backward: what autograd keeps is of the order of
    q, k, v and the gates, not the pairwise decays (16·d_k floats per token and head)."""
    gen = torch.Generator().manual_seed(0)
    q, k, g = (torch.randn(1, 2, 1024, 16, generator=gen).requires_grad_(True) for _ in range(3))
    v = torch.randn(1, 2, 1024, 32, generator=gen).requires_grad_(True)
    kept: dict[int, int] = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = chunked(q, k, v, F.logsigmoid(g) / 16, None, 64)
    inputs = sum(x.numel() * 4 for x in (q, k, v, g))
    assert sum(kept.values()) < 2 * inputs, (sum(kept.values()), inputs)
    out.sum().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (q, k, v, g))
