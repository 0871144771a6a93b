"""Context parallelism measured: logits with document masks equal one process's, bytes per
layer against the formulas (≤ 2%), and the attention activations kept for backward falling
as 1/cp. Loss/gradient parity of every mode
is in test_parity.py; the kernel against SDPA on one process is in tests/unit."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from plait.config import build_config
from plait.launch import spawn
from plait.models.llama import build_model
from plait.telemetry import collectives as comm
from plait.parallel.context_parallel import sequence_layout
from tests.parallel.harness import context_parallel_model

BATCH, SEQ, DIM, HEADS, LAYERS = 2, 64, 64, 4, 2
HEAD_DIM = DIM // HEADS
MODES = {"ring": {}, "ulysses": {}, "hybrid": {"parallel.cp_ulysses": 2}}


def config(cp: int, mode: str = "ring", **values):
    base = {
        "model.vocab_size": 128, "model.dim": DIM, "model.n_layers": LAYERS, "model.n_heads": HEADS,
        "model.ffn_dim": 128, "train.seq_len": SEQ, "train.global_batch": BATCH, "train.micro_batch": BATCH,
        "parallel.nproc": cp, "parallel.cp": cp, "parallel.cp_mode": mode, "parallel.dp_shard": 1,
        **values,
    }
    return build_config(values=base)


def inputs(doc_lengths: tuple[int, ...] | None) -> dict[str, torch.Tensor]:
    """A fixed batch; position ids restart at every document of ``doc_lengths`` (None: one)."""
    ids = torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    if doc_lengths is None:
        pos = torch.arange(SEQ)
    else:
        pos = torch.cat([torch.arange(n) for n in doc_lengths])
    return {"input_ids": ids, "position_ids": pos.expand(BATCH, SEQ).contiguous()}


def attention_saved_bytes(model, batch) -> int:
    """Bytes of the tensors autograd keeps for backward inside attention cores, one forward."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for block in model.layers.values():
        inner = block.attention.core

        def counted(*args, inner=inner):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                return inner(*args)

        block.attention.core = counted
    model(batch["input_ids"], batch["position_ids"], doc_mask=False)
    return sum(seen.values())


def measure(cp: int) -> dict:
    """On each of ``cp`` ranks, for every mode: wire bytes on the cp dims of one forward and
    one backward (with and without document masks), and attention's saved bytes."""
    out: dict[str, dict] = {}
    for mode, extra in MODES.items():
        cfg = config(cp, mode, **extra)
        model, dims = context_parallel_model(cfg, cp)
        layout = sequence_layout(cfg)
        figures = {}
        for docs in (None, (10, 30, 24)):
            batch = {k: layout.shard(v, dims.cp_rank()) for k, v in inputs(docs).items()}
            comm.reset()
            logits = model(batch["input_ids"], batch["position_ids"], doc_mask=docs is not None)
            forward = comm.step_summary()["comm_bytes"]
            logits.float().pow(2).mean().backward()
            backward = comm.step_summary()["comm_bytes"]
            figures["docs" if docs else "plain"] = {"forward": forward, "backward": backward,
                                                    # numpy: a tensor would travel as shared memory
                                                    # that dies with this process
                                                    "logits": logits.detach().numpy(),
                                                    "index": layout.token_index(dims.cp_rank(), SEQ).numpy()}
        figures["saved"] = attention_saved_bytes(model, batch)
        out[mode] = figures
    return out


@pytest.fixture(scope="module")
def measured():
    return spawn(measure, 4, (4,))


def test_logits_with_document_masks_match_one_process(measured):
    """Every mode, on a batch of three documents (10, 30, 24 tokens: none a multiple of the
    chunk length), gives the single process's document-masked logits, which differ from
    the unmasked ones: so the masks are applied, and across chunks and ranks correctly."""
    cfg = config(1)
    model = build_model(cfg.model)
    batch = inputs((10, 30, 24))
    with torch.no_grad():
        masked = model(batch["input_ids"], batch["position_ids"], doc_mask=True)
        unmasked = model(batch["input_ids"], batch["position_ids"], doc_mask=False)
    assert (masked - unmasked).abs().max() > 1e-3
    for mode in MODES:
        got = torch.empty_like(masked)
        for rank in measured:
            got[:, torch.from_numpy(rank[mode]["docs"]["index"])] = torch.from_numpy(rank[mode]["docs"]["logits"])
        torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-6)


def kv_bytes(tokens: int) -> int:
    """One K plus one V of ``tokens`` tokens (fp32, MHA)."""
    return 2 * BATCH * tokens * DIM * 4


def assert_ratio(got: int, want: float) -> None:
    assert 1.0 <= got / want <= 1.02, (got, want)


def test_ring_sends_the_other_ranks_kv_per_layer(measured):
    cp, local = 4, SEQ // 4
    for rank in measured:
        figures = rank["ring"]["plain"]
        assert set(figures["forward"]) == {"cp"}
        # Forward: the K/V of the other cp - 1 ranks pass through every rank once per layer.
        assert_ratio(figures["forward"]["cp"] / LAYERS, (cp - 1) * kv_bytes(local))
        # Backward: K/V again (cp - 1 hops), and their gradients (cp hops, back to the owner).
        assert_ratio(figures["backward"]["cp"] / LAYERS, (2 * cp - 1) * kv_bytes(local))


def test_document_masks_cost_one_position_gather_per_forward(measured):
    cp, local = 4, SEQ // 4
    gather = (cp - 1) * BATCH * local * 8  # int64 position ids of the other ranks
    for rank in measured:
        plain, docs = rank["ring"]["plain"]["forward"]["cp"], rank["ring"]["docs"]["forward"]["cp"]
        assert docs - plain == gather


def test_ulysses_four_all_to_alls_of_s_h_over_cp_per_layer(measured):
    cp, local = 4, SEQ // 4
    per_all_to_all = (cp - 1) / cp * BATCH * local * DIM * 4  # s·h/cp elements, (n-1)/n leave
    for rank in measured:
        figures = rank["ulysses"]["plain"]
        assert_ratio(figures["forward"]["cp"] / LAYERS, 4 * per_all_to_all)
        assert_ratio(figures["backward"]["cp"] / LAYERS, 4 * per_all_to_all)


def test_hybrid_splits_traffic_between_its_dims(measured):
    local = SEQ // 4
    for rank in measured:
        forward = rank["hybrid"]["plain"]["forward"]
        # Ulysses over 2 ranks, then a ring of 2 whose blocks hold both ranks' tokens (2·local)
        # for half of the heads: one hop of kv_bytes(2·local) / 2.
        assert_ratio(forward["cp_ulysses"] / LAYERS, 4 * (1 / 2) * BATCH * local * DIM * 4)
        assert_ratio(forward["cp_ring"] / LAYERS, 1 * kv_bytes(2 * local) / 2)


def test_attention_memory_falls_as_one_over_cp(measured):
    """Per rank, attention keeps 1/cp of what the single-process model keeps for backward."""
    cfg = config(1)
    single = attention_saved_bytes(build_model(cfg.model), inputs(None))
    for rank in measured:
        for mode in MODES:
            share = rank[mode]["saved"] / single
            assert 0.95 / 4 <= share <= 1.05 / 4, (mode, share)
