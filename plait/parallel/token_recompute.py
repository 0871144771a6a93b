"""Token-wise recompute (``memory.recompute_fraction``, after MEMO, SIGMOD 2025): keep the
activations of part of each block's tokens and recompute the rest in backward, so memory and
compute trade continuously instead of all-or-nothing checkpointing.

A softmax block is per-token work around one token-mixing step: RMSNorm, the q/k/v projections
and RoPE before the attention core; the output projection, the residual, RMSNorm and the MLP
after it. For the last ``fraction`` of the tokens (of this rank's tokens, under context
parallelism) those two per-token regions run under non-reentrant checkpointing, so only their
inputs are kept; the first tokens keep everything as usual. The attention core always runs
once over all tokens and keeps what it saves (queries, keys, values, output, log-sum-exp):
recomputing it would repeat the whole quadratic step. Every token's result is computed by the
same operations as without recompute, so training is unchanged.

Applied like activation checkpointing (plait/parallel/recompute.py): the block's ``forward`` is
replaced on the instance, so parameter names and the order TP -> recompute -> FSDP hold; the
two exclude each other. Activation offload (plait/parallel/activation_offload.py) composes: it
moves what is kept, the inputs of the recomputed regions included, to host memory.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from plait.parallel.recompute import model_blocks

_ATTR = "_plait_recompute_fraction"


def recomputed_tokens(seq: int, fraction: float) -> int:
    """How many of ``seq`` tokens a block recomputes."""
    return min(seq, max(0, round(fraction * seq)))


def _tokenwise_forward(self: nn.Module, x, cos, sin, keys, cache=None, layer=0):
    seq = x.shape[1]
    cut = seq - recomputed_tokens(seq, getattr(self, _ATTR))
    if not torch.is_grad_enabled() or cache is not None or cut == seq:
        return type(self).forward(self, x, cos, sin, keys, cache, layer)
    attention = self.attention

    def before_core(xs, cs, ss):
        return attention.project(self.attention_norm(xs), cs, ss)

    def after_core(out, xs):
        return self.mlp_residual(xs + attention.output(out))

    def by_tokens(region, *inputs: torch.Tensor) -> list[Any]:
        """``region`` on the kept tokens, then checkpointed on the recomputed ones."""
        kept = [region(*(_tokens(t, 0, cut) for t in inputs))] if cut else []
        return kept + [checkpoint(region, *(_tokens(t, cut, seq - cut) for t in inputs), use_reentrant=False)]

    pieces = by_tokens(before_core, x, cos, sin)
    q, k, v = (torch.cat([piece[i] for piece in pieces], dim=2) for i in range(3))
    return torch.cat(by_tokens(after_core, attention.core(q, k, v, keys), x), dim=1)


def _tokens(t: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Tokens ``start:start+length`` of (batch, seq, ...) or, per head, (batch, heads, seq, d)."""
    return t.narrow(2 if t.ndim == 4 else 1, start, length)


def apply_tokenwise_recompute(model: nn.Module, fraction: float) -> None:
    """Recompute ``fraction`` of every block's tokens in backward (in place; 0 does nothing)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"recompute_fraction must be in [0, 1], got {fraction!r}")
    if fraction == 0:
        return
    for _, block in model_blocks(model):
        if "forward" in block.__dict__:
            raise ValueError(f"{type(block).__name__} already has an instance-level forward; not wrapping it")
        setattr(block, _ATTR, fraction)
        block.forward = types.MethodType(_tokenwise_forward, block)


def remove_tokenwise_recompute(model: nn.Module) -> None:
    """Undo :func:`apply_tokenwise_recompute`."""
    for _, block in model_blocks(model):
        if getattr(block, _ATTR, None) is not None:
            del block.forward
            delattr(block, _ATTR)
