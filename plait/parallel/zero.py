"""ZeRO stages on the ``dp_shard`` mesh dim (``parallel.zero``).

| zero | parameters | gradients | optimizer state | traffic per step (n ranks, Ψ params) |
|---|---|---|---|---|
| 0 | replicated | replicated (all-reduce) | replicated | 2(n−1)/n·Ψ |
| 1 | replicated | replicated (all-reduce) | sharded: each rank updates the parameters it owns, then broadcasts them | 2(n−1)/n·Ψ + (n−1)/n·Ψ |
| 2 | sharded at rest, gathered once per micro-batch and kept until backward ends | sharded (reduce-scatter) | sharded | (n−1)/n·Ψ·(m + 1) |
| 3 | sharded, gathered per block in forward and again in backward | sharded (reduce-scatter) | sharded | (n−1)/n·Ψ·(2m + 1) |

(m = micro-batches per step.) Stages 2 and 3 are FSDP2 (``fully_shard`` with or without
resharding after forward); stage 1 is DDP plus torch's ZeroRedundancyOptimizer over the
``dp_shard`` group; stage 0 is DDP. Model-state bytes per rank with fp32 AdamW (4 bytes of
parameter, 4 of gradient, 8 of moments per parameter), as ``state_bytes`` counts them after
backward: zero 0 16Ψ; zero 1 8Ψ + 8Ψ/n; zero 2 and 3 16Ψ/n — zero 2 additionally holds the
gathered 4Ψ from forward until its backward ends (the ZeRO paper's 2Ψ fp16 working copy).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from plait.config import TrainConfig


def build_zero1_optimizer(parts: list[nn.Module], cfg: TrainConfig, group,
                          optimizer_class: type = torch.optim.AdamW) -> ZeroRedundancyOptimizer:
    """AdamW whose state is split over ``group``: each rank owns a subset of the parameters
    (balanced by size), keeps their moments, updates them, and broadcasts the new values.
    ``optimizer_class`` is the local AdamW (a host-offloading one for ``memory.offload``)."""
    params = [p for part in parts for p in part.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return ZeroRedundancyOptimizer(
        groups, optimizer_class=optimizer_class, process_group=group,
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
    )


def zero1_state_dict(optimizer: ZeroRedundancyOptimizer, model: nn.Module, for_load: bool = False) -> dict[str, Any]:
    """This rank's share of the optimizer state in the layout-independent form that
    ``get_state_dict`` produces (``state`` keyed by parameter name, ``param_groups`` with
    names), so a ZeRO-1 checkpoint loads under FSDP and the other way round.

    With ``for_load`` the owned entries are allocated (zeros) for DCP to fill in place."""
    names = {p: name for name, p in model.named_parameters()}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for group in optimizer.optim.param_groups:
        for p in group["params"]:
            if for_load:
                state[names[p]] = {
                    "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p),
                    "step": torch.zeros((), dtype=torch.float32),
                }
            elif p in optimizer.optim.state:
                state[names[p]] = dict(optimizer.optim.state[p])
    groups = []
    for group in optimizer.param_groups:
        entry = {k: v for k, v in group.items() if k != "params"}
        entry["params"] = [names[p] for p in group["params"]]
        groups.append(entry)
    return {"state": state, "param_groups": groups}


def load_zero1_state_dict(optimizer: ZeroRedundancyOptimizer, model: nn.Module, loaded: dict[str, Any]) -> None:
    """Put the moments loaded by DCP (see ``zero1_state_dict(for_load=True)``) into the local
    AdamW of this rank."""
    by_name = dict(model.named_parameters())
    for name, values in loaded["state"].items():
        optimizer.optim.state[by_name[name]] = values


def state_bytes(parts: list[nn.Module], optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """Bytes this rank holds right now for parameters, gradients and optimizer state (none
    without ``optimizer``), counting the local shard of sharded tensors (storage only, exactly)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = [p for part in parts for p in part.parameters()]
    inner = optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer
    states = inner.state.values() if inner is not None else []
    moments = [v for s in states for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
    return {
        "params": sum(local(p).numel() * p.element_size() for p in params),
        "grads": sum(local(p.grad).numel() * p.grad.element_size() for p in params if p.grad is not None),
        "optimizer": sum(local(v).numel() * v.element_size() for v in moments),
    }
