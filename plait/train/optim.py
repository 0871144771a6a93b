"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from plait.config import TrainConfig
from plait.train.host_optimizer import HostOffloadAdamW


def build_optimizer(parts: list[nn.Module], cfg: TrainConfig, host: bool = False) -> torch.optim.AdamW:
    """One AdamW over the parameters of all model ``parts`` (pipeline stages of this rank);
    norms and biases (1-D) get no weight decay. ``host``: its state and update in host memory
    (``memory.offload = optimizer``)."""
    params = [p for part in parts for p in part.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kind = HostOffloadAdamW if host else torch.optim.AdamW
    return kind(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, pp_group=None) -> float:
    """Clip gradients to a global L2 norm of ``max_norm`` (0 = no clipping) and return the norm
    before clipping. Sharded (DTensor) gradients count once, whatever mesh they live on (TP
    and FSDP, expert-parallel, or plain replicated tensors may mix); with pipeline parallelism
    the squares are summed over the stages of ``pp_group`` so every stage clips alike."""
    by_mesh: dict[object, list[torch.Tensor]] = {}  # foreach kernels take one mesh at a time
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    squared = torch.zeros((), dtype=torch.float32)
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        squared = squared.to(norm.device) + norm.float().pow(2)
    if pp_group is not None:
        torch.distributed.all_reduce(squared, group=pp_group)
    norm = squared.sqrt()
    if max_norm > 0:
        for group in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm, foreach=True)
    return float(norm)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr before optimizer step ``step`` (0-based).

    Linear warmup over ``warmup_steps``, then ``cosine`` decay to ``min_lr_ratio``, ``wsd``
    (warmup-stable-decay: constant, then linear decay over the last ``decay_fraction`` of the
    steps), or ``constant``.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(cfg.decay_fraction * cfg.steps))
    decay_start = cfg.steps - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - floor) * min(1.0, (step - decay_start + 1) / decay_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
