"""The global-batch load-balancing loss on 4 ranks equals the single-process value over the
whole global batch; the micro-batch scope does not (so the test can tell them apart)."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from plait.config import ModelConfig
from plait.launch import spawn
from plait.models.llama import build_model
from plait.train.moe_control import GlobalBatchCounts

CFG = ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, ffn_dim=32, moe_experts=8, moe_top_k=2)


def batch() -> torch.Tensor:
    # Tokens that differ between quarters, so each rank's own counts are far from the global ones.
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    return x + torch.arange(64).div(16, rounding_mode="floor")[:, None].float()


def balance_losses() -> dict[str, float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    moe = build_model(CFG).layers["0"].feed_forward
    mine = batch().chunk(world)[rank]
    moe(mine)
    local = float(moe.stats["balance_loss"])
    moe.balance_counts = GlobalBatchCounts(dist.group.WORLD)
    moe(mine)
    return {"global": float(moe.stats["balance_loss"]), "micro": local}


def test_global_scope_on_4_ranks_equals_one_process_over_the_whole_batch():
    ranks = spawn(balance_losses, 4)
    single = build_model(dataclasses.replace(CFG)).layers["0"].feed_forward
    single(batch())
    want = float(single.stats["balance_loss"])
    # Data parallelism averages the ranks' losses (and gradients): the mean is what trains.
    global_mean = sum(r["global"] for r in ranks) / 4
    micro_mean = sum(r["micro"] for r in ranks) / 4
    assert abs(global_mean - want) <= 1e-6 * want
    assert abs(micro_mean - want) > 1e-2 * want
