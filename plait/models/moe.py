"""Mixture-of-experts feed-forward layer (Mixtral, Qwen2-MoE, DeepSeek-style), plain PyTorch.

A router scores every token against every expert (softmax over experts, or a sigmoid per
expert), keeps the top k, and the token's output is the score-weighted sum of those experts'
SwiGLU outputs (plus an always-on shared expert, optionally gated). Experts are stored as
stacked weights, ``w1``/``w3`` (experts, hidden, dim) and ``w2`` (experts, dim, hidden), i.e.
one ``nn.Linear`` weight per expert, so Hugging Face checkpoints convert by stacking. Experts
run as grouped matmuls (``torch._grouped_mm``) where torch supports the shapes, else a loop.

Dispatch sorts the (token, expert) assignments by expert and runs each expert once on exactly
its tokens:
- ``dropless``: every assignment is computed;
- ``capacity``: each expert takes at most ceil(capacity_factor · tokens · k / experts)
  assignments, in token order; the rest are dropped (they contribute nothing; the residual
  stream carries the token on) and counted.

Hooks for parallel code, which the model itself never touches:
- ``expert_compute(x, counts, experts)``: runs the experts on expert-sorted rows; expert
  parallelism replaces it with an all-to-all exchange around the local experts;
- ``balance_counts(counts)``: turns this forward's tokens-per-expert into the counts the
  load-balancing loss uses (the default: these counts alone, micro-batch scope);
- ``aux_weight``: what the auxiliary losses are multiplied by before their gradient joins
  the main loss's (set by the trainer each step; 0 leaves them out of training).

The auxiliary losses (load balance n_experts · Σ f_i·p_i and the router z-loss) reach the
gradients through ``AddAuxGradient`` at the layer's output, so they work inside pipeline
stages and activation checkpointing without being threaded to the loss function.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from plait.config import ModelConfig


def run_experts(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                w3: torch.Tensor) -> torch.Tensor:
    """SwiGLU of each expert on its rows: ``x`` (rows, dim) sorted by expert, ``counts[e]``
    rows for expert e of the stacked weights. One grouped matmul per weight where torch has
    one for these shapes and dtype (``torch._grouped_mm``: fp32/bf16/fp16, rows of 16-byte
    multiples), a loop over experts otherwise."""
    if _grouped_mm_fits(x, w1, w2):
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        gated = F.silu(torch._grouped_mm(x, w1.transpose(-2, -1), offs=offsets))
        hidden = gated * torch._grouped_mm(x, w3.transpose(-2, -1), offs=offsets)
        return torch._grouped_mm(hidden, w2.transpose(-2, -1), offs=offsets)
    outputs = []
    for e, rows in enumerate(torch.split(x, counts.tolist())):
        if rows.shape[0] == 0:
            continue
        hidden = F.silu(rows @ w1[e].t()) * (rows @ w3[e].t())
        outputs.append(hidden @ w2[e].t())
    if outputs:
        return torch.cat(outputs)
    # No rows at all: still an output on the autograd graph (of x and the weights), so backward
    # reaches the collectives that produced x on this rank too (expert parallelism's
    # all-to-all, in which every rank takes part even with nothing to send).
    rows = x[:0]
    return (F.silu(rows @ w1[0].t()) * (rows @ w3[0].t())) @ w2[0].t()


def _grouped_mm_fits(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if not (x.dtype == w1.dtype == w2.dtype) or x.shape[0] == 0:
        return False
    per_16_bytes = 16 // x.element_size()
    return x.shape[1] % per_16_bytes == 0 and w1.shape[1] % per_16_bytes == 0


def local_experts(x: torch.Tensor, counts: torch.Tensor, experts: "Experts") -> torch.Tensor:
    """The default ``MoE.expert_compute``: every expert lives in this process."""
    return experts(x, counts)


class Experts(nn.Module):
    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows ``x`` sorted by expert, ``counts[e]`` of them for expert e (through the module
        call, so wrappers such as FSDP gather the weights first)."""
        return run_experts(x, counts, self.w1, self.w2, self.w3)


class SharedExpert(nn.Module):
    """The always-on expert, SwiGLU with optional sigmoid gate (Qwen2-MoE)."""

    def __init__(self, dim: int, hidden: int, gated: bool):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.gate = nn.Linear(dim, 1, bias=False) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return out if self.gate is None else out * torch.sigmoid(self.gate(x))


class AddAuxGradient(torch.autograd.Function):
    """Identity on ``x``; in backward also sends gradient ``weight`` into ``aux`` (a scalar
    loss), as if ``weight · aux`` had been added to the loss."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, weight: float):
        ctx.weight = weight
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        aux_grad = torch.full(ctx.aux_shape, ctx.weight, dtype=ctx.aux_dtype, device=grad.device)
        return grad, aux_grad, None


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.moe_experts, cfg.moe_top_k
        self.router_kind, self.norm_topk = cfg.moe_router, cfg.moe_norm_topk or cfg.moe_router == "sigmoid"
        self.dispatch, self.capacity_factor = cfg.moe_dispatch, cfg.moe_capacity_factor
        self.gate = nn.Linear(cfg.dim, cfg.moe_experts, bias=False)
        self.experts = Experts(cfg.moe_experts, cfg.dim, cfg.moe_ffn_dim or cfg.ffn_dim)
        self.shared = (SharedExpert(cfg.dim, cfg.moe_shared_ffn_dim, cfg.moe_shared_gate)
                       if cfg.moe_shared_ffn_dim else None)
        self.expert_compute: Callable = local_experts
        self.balance_counts: Callable[[torch.Tensor], torch.Tensor] = lambda counts: counts
        self.aux_weight = 0.0
        self.z_weight = 0.0
        self.stats: dict[str, torch.Tensor] = {}  # of the last forward, detached
        self.totals: dict[str, torch.Tensor] = {}  # summed over training forwards since reset_totals()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits fp32, per-expert probabilities, top-k weights, top-k expert ids) of
        tokens ``x`` (tokens, dim)."""
        logits = self.gate(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 routing is fp32
        probs = torch.softmax(logits, dim=-1) if self.router_kind == "softmax" else torch.sigmoid(logits)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        if self.router_kind == "sigmoid":  # the balance loss wants a distribution over experts
            probs = probs / probs.sum(-1, keepdim=True)
        return logits, probs, weights, ids

    def capacity(self, tokens: int) -> int:
        return math.ceil(self.capacity_factor * tokens * self.top_k / self.n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        tokens = x.shape[0]
        logits, probs, weights, ids = self.route(x)
        flat_ids = ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)  # assignments grouped by expert, token order within
        counts = torch.bincount(flat_ids, minlength=self.n_experts)
        keep = order
        if self.dispatch == "capacity":
            sorted_ids = flat_ids[order]
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(order.numel(), device=x.device) - starts[sorted_ids]
            keep = order[slot < self.capacity(tokens)]
            kept_counts = torch.bincount(flat_ids[keep], minlength=self.n_experts)
        else:
            kept_counts = counts
        rows = keep // self.top_k  # the token of each kept assignment
        out_rows = self.expert_compute(x[rows], kept_counts, self.experts)
        out_rows = out_rows * weights.reshape(-1)[keep, None].to(out_rows.dtype)
        out = torch.zeros_like(x).index_add_(0, rows, out_rows.to(x.dtype))
        if self.shared is not None:
            out = out + self.shared(x)
        out = self._attach_aux_losses(out, logits, probs, counts, tokens)
        self.stats.update(tokens_per_expert=counts.detach(), dropped=(counts.sum() - kept_counts.sum()).detach(),
                          assignments=counts.sum().detach())
        if torch.is_grad_enabled():
            for key, value in self.stats.items():
                self.totals[key] = self.totals.get(key, 0) + value.detach().double()
            self.totals["forwards"] = self.totals.get("forwards", 0) + torch.ones((), dtype=torch.float64)
        return out.reshape(shape)

    def reset_totals(self) -> None:
        self.totals = {}

    def _attach_aux_losses(self, out, logits, probs, counts, tokens) -> torch.Tensor:
        """Load-balancing loss n_experts · Σ f_i·p_i (f_i: share of assignments routed to
        expert i, under ``balance_counts``' scope; p_i: mean router probability here) and the
        z-loss; their values go to ``stats`` and their gradients into training."""
        scoped = self.balance_counts(counts.detach().to(probs.dtype))
        f = scoped / scoped.sum().clamp(min=1)
        balance = self.n_experts * (f * probs.mean(0)).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        self.stats.update(balance_loss=balance.detach(), z_loss=z.detach())
        if torch.is_grad_enabled() and (self.aux_weight or self.z_weight):
            aux = self.aux_weight * balance + self.z_weight * z
            out = AddAuxGradient.apply(out, aux, 1.0)
        return out
