"""What the trainer does with a mixture-of-experts model's layers each step.

- Weights the auxiliary losses: each micro-batch's load-balancing and z-losses enter the
  gradient with ``coef / micro-batches per rank``; data parallelism averages over ranks, so
  the step's auxiliary loss is the coefficient times the mean over all micro-batches of the
  global batch, whatever the layout.
- ``moe.balance_scope = "global_batch"``: the tokens-per-expert counts f_i of the balance
  loss are all-reduced over the data-parallel ranks and accumulated over the step's
  micro-batches so far (micro-batch k uses the counts of micro-batches 1..k of every rank),
  while the router probabilities p_i stay local (the global-batch balancing of Qiu et al.,
  "Demons in the detail", 2025). With one micro-batch per rank this is exactly the
  single-process value over the whole global batch.
- Collects each layer's tokens per expert, dropped assignments and auxiliary losses for the
  metrics, summed over data-parallel ranks and gathered over pipeline stages, and draws the
  expert-load heat map at the end.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from plait.config import JobConfig
from plait.models.moe import MoE
from plait.telemetry import collectives as comm


class GlobalBatchCounts:
    """``MoE.balance_counts`` for the global-batch scope (one per layer)."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.running: torch.Tensor | None = None

    def reset(self) -> None:
        self.running = None

    def __call__(self, counts: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # validation: this forward's own counts, no traffic
            return counts
        counts = counts.clone()
        if self.group is not None:
            dist.all_reduce(counts, group=self.group)
        self.running = counts if self.running is None else self.running + counts
        return self.running.clone()


class MoEControl:
    def __init__(self, parts: list[nn.Module], cfg: JobConfig, n_micro: int,
                 dp_group: dist.ProcessGroup | None, pp_group: dist.ProcessGroup | None, device: torch.device):
        self.layers: dict[int, MoE] = {}
        for part in parts:
            for name, block in part.layers.items():
                moe = next((m for m in block.modules() if isinstance(m, MoE)), None)
                if moe is not None:
                    self.layers[int(name)] = moe
        self.n_layers, self.n_experts = cfg.model.n_layers, cfg.model.moe_experts
        self.dp_group, self.pp_group, self.device = dp_group, pp_group, device
        self.counters: list[GlobalBatchCounts] = []
        for moe in self.layers.values():
            moe.aux_weight = cfg.moe.aux_loss_coef / n_micro
            moe.z_weight = cfg.moe.z_loss_coef / n_micro
            if cfg.moe.balance_scope == "global_batch":
                counter = GlobalBatchCounts(dp_group)
                moe.balance_counts = counter
                self.counters.append(counter)
        self.load_history: list[tuple[int, list[list[float]]]] = []

    def begin_step(self) -> None:
        for counter in self.counters:
            counter.reset()
        for moe in self.layers.values():
            moe.reset_totals()

    def step_metrics(self, step: int) -> dict[str, Any]:
        """Collective over dp and pp: this step's expert figures for metrics.jsonl."""
        # Rows: layers; columns: experts, then dropped, assignments, balance, z, forwards.
        table = torch.zeros(self.n_layers, self.n_experts + 5, dtype=torch.float64)
        for index, moe in self.layers.items():
            t = moe.totals
            table[index, : self.n_experts] = t["tokens_per_expert"].cpu()
            table[index, self.n_experts :] = torch.stack(
                [t["dropped"], t["assignments"], t["balance_loss"], t["z_loss"], t["forwards"]]).cpu()
        table = table.to(self.device)
        with comm.paused():  # metrics, not training traffic
            for group in (self.dp_group, self.pp_group):
                if group is not None:
                    dist.all_reduce(table, group=group)
        table = table.cpu()
        load = table[:, : self.n_experts]
        dropped, assignments, balance, z, forwards = table[:, self.n_experts :].unbind(1)
        per_layer_imbalance = (load.max(1).values / load.mean(1).clamp(min=1e-9)).tolist()
        fractions = (load / load.sum(1, keepdim=True).clamp(min=1)).tolist()
        self.load_history.append((step, fractions))
        return {
            "moe_balance_loss": float((balance / forwards).mean()),
            "moe_z_loss": float((z / forwards).mean()),
            "moe_dropped": float(dropped.sum() / assignments.sum().clamp(min=1)),
            "moe_load_imbalance": per_layer_imbalance,
            "moe_tokens_per_expert": load.long().tolist(),
        }

    def plot_load(self, path: str, title: str) -> bool:
        """Heat map of each expert's share of its layer's tokens over the steps (rank 0)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        if not self.load_history:
            return False
        steps = [s for s, _ in self.load_history]
        # One row per (layer, expert), one column per logged step.
        grid = torch.tensor([[share for layer in loads for share in layer] for _, loads in self.load_history]).t()
        fig, ax = plt.subplots(figsize=(8, max(3.0, 0.12 * grid.shape[0])))
        image = ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="viridis",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, grid.shape[0] - 0.5, -0.5))
        ax.set_yticks([layer * self.n_experts for layer in range(self.n_layers)],
                      [f"layer {layer}" for layer in range(self.n_layers)])
        ax.set_xlabel("step")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, label=f"share of the layer's tokens (fair: {1 / self.n_experts:.3f})")
        fig.tight_layout()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return True
