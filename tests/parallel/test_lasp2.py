"""LASP-2 measured on 4 gloo ranks: the cp ranks' logits equal one process's (GLA and hybrid
models, with documents, contiguous and zigzag splits), and the bytes per layer equal the
formula at every sequence length. Training parity is in test_parity.py."""

from __future__ import annotations

import pytest
import torch

from plait.config import build_config
from plait.launch import spawn
from plait.models.llama import build_model
from plait.parallel.context_parallel import sequence_layout
from plait.telemetry import collectives as comm
from tests.parallel.harness import context_parallel_model

CP, DIM, HEADS, LAYERS = 4, 32, 2, 2
LENGTHS = (4096, 16384, 65536)
DOCS = (100, 7, 300, 5, 100)  # 512 tokens: documents that start inside chunks and pieces
MODELS = {"gla": {"parallel.cp_shard": "contiguous"}, "gla_zigzag": {"parallel.cp_shard": "zigzag"},
          "hybrid": {"model.layer_pattern": "gs"}}


def config(cp: int, seq: int, **values):
    base = {"model.vocab_size": 128, "model.dim": DIM, "model.n_layers": LAYERS, "model.n_heads": HEADS,
            "model.ffn_dim": 64, "model.max_seq_len": max(LENGTHS), "model.attention": "gla", "model.gla_chunk": 64,
            "train.seq_len": seq, "train.global_batch": 1, "train.micro_batch": 1, "parallel.nproc": cp,
            "parallel.cp": cp, "parallel.dp_shard": 1, **values}
    return build_config(values=base)


def ids(seq: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, seq), generator=torch.Generator().manual_seed(0))


def doc_positions() -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in DOCS])[None]


def cp_model(cfg):
    return context_parallel_model(cfg, CP)


def measure() -> dict:
    out: dict = {"logits": {}, "bytes": {}}
    seq = sum(DOCS)
    for name, values in MODELS.items():
        cfg = config(CP, seq, **values)
        model, dims = cp_model(cfg)
        layout = sequence_layout(cfg)
        local = lambda t: layout.shard(t, dims.cp_rank())  # noqa: E731
        with torch.no_grad():
            logits = model(local(ids(seq)), local(doc_positions()))
        out["logits"][name] = {"logits": logits.numpy(), "index": layout.token_index(dims.cp_rank(), seq).numpy()}
    for seq in LENGTHS:
        model, dims = cp_model(config(CP, seq))
        layout = sequence_layout(config(CP, seq))
        comm.reset()
        logits = model(layout.shard(ids(seq), dims.cp_rank()), doc_mask=False)
        forward = comm.step_summary()["comm_bytes"].get("cp", 0)
        logits.float().pow(2).mean().backward()
        backward = comm.step_summary()["comm_bytes"].get("cp", 0)  # counted since the last summary
        out["bytes"][seq] = {"forward": forward, "backward": backward}
    return out


@pytest.fixture(scope="module")
def measured():
    return spawn(measure, CP, ())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_with_documents_match_one_process(measured, name):
    cfg = config(1, sum(DOCS), **{"parallel.nproc": 1, **MODELS[name]})
    model = build_model(cfg.model)
    with torch.no_grad():
        want = model(ids(sum(DOCS)), doc_positions())
        unmasked = model(ids(sum(DOCS)))
    assert (want - unmasked).abs().max() > 1e-3  # the documents matter
    got = torch.empty_like(want)
    for rank in measured:
        part = rank["logits"][name]
        got[:, torch.from_numpy(part["index"])] = torch.from_numpy(part["logits"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bytes_per_layer_are_the_formula_at_every_length(measured):
    """Forward: one all-gather of each rank's state and decay, (cp − 1)·h·(d_k·d_v + d_k)·4
    bytes on the wire per rank; backward: one of the state gradients, (cp − 1)·h·d_k·d_v·4.
    The same at 4k, 16k and 64k tokens."""
    dk, dv = config(CP, LENGTHS[0]).model.gla_dims()
    forward = (CP - 1) * HEADS * (dk * dv + dk) * 4
    backward = (CP - 1) * HEADS * dk * dv * 4
    for rank in measured:
        figures = [rank["bytes"][seq] for seq in LENGTHS]
        for per_length in figures:
            assert abs(per_length["forward"] / LAYERS / forward - 1) <= 0.02, (per_length, forward)
            assert abs(per_length["backward"] / LAYERS / backward - 1) <= 0.02, (per_length, backward)
        assert all(f == figures[0] for f in figures), figures
