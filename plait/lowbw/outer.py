"""The outer optimizer: SGD with (Nesterov) momentum on the global weights, plus CO2's two
stabilisers. Plain tensor math on flat float32 vectors, so tests can check it by hand.

With averaged outer gradient g (global − local, averaged over workers), momentum mu, lr eta:
    b <- mu·b + g;   step = g + mu·b (Nesterov) or b;   global <- global − eta·step
(b starts at zero, so the first b is g, as in torch.optim.SGD.)

CO2 adds, before the momentum update:
- a staleness gap penalty: its g arrives one round late, measured against global weights that
  the previous outer step has moved since. Per weight tensor k the stale g_k is scaled by
  1 / (1 + lambda·|gap_k| / |g_k|), gap = global now − global when g's round began: the
  further the global weights moved while g was in flight, relative to g's own size, the less
  of it is applied (lambda = 0: no penalty). Every input is the same on all workers, so their
  global weights stay identical;
- outer momentum clipping: after the momentum update and before the step, b is scaled down to
  norm at most ``clip`` (clip = 0: no clipping). The norm is over the whole worker's model, so
  the caller passes ``total_sq`` that sums this rank's squared norm over the worker's ranks.
"""

from __future__ import annotations

from typing import Callable

import torch


def staleness_scales(stale: torch.Tensor, gap: torch.Tensor, sizes: list[int], penalty: float) -> torch.Tensor:
    """Per-element scale 1/(1 + penalty·|gap_k|/|stale_k|) for the tensors of ``sizes``."""
    if penalty == 0 or stale.numel() == 0:
        return torch.ones_like(stale)
    scales = []
    for s, g in zip(stale.split(sizes), gap.split(sizes)):
        ratio = g.norm() / s.norm().clamp_min(1e-12)
        scales.append(torch.full_like(s, float(1.0 / (1.0 + penalty * ratio))))
    return torch.cat(scales)


def outer_step(global_w: torch.Tensor, momentum: torch.Tensor, grad: torch.Tensor, lr: float, mu: float,
               nesterov: bool, clip: float = 0.0, total_sq: Callable[[float], float] = lambda x: x) -> None:
    """One outer SGD step on ``global_w`` in place; ``momentum`` is updated in place too."""
    if mu == 0:
        global_w.sub_(grad, alpha=lr)
        return
    momentum.mul_(mu).add_(grad)
    if clip > 0:
        norm = total_sq(float(momentum.pow(2).sum())) ** 0.5
        if norm > clip:
            momentum.mul_(clip / norm)
    step = grad.add(momentum, alpha=mu) if nesterov else momentum
    global_w.sub_(step, alpha=lr)
