"""The gated-linear-attention token mixer (GLA, Yang et al. 2023), a drop-in for ``Attention``
in the Llama block: same call, same place in the block, no positional encoding of its own.

Per head: q, k (d_k) and v (d_v) projections; a forget gate α = sigmoid(W_up W_down x + b)^(1/τ)
per key dimension, low-rank (``model.gla_gate_rank``) and made in log space
(``logsigmoid / τ``); the recurrence of plait/models/linear_attention.py; then an RMSNorm per
head (weights shared by the heads), an output gate swish(W_r x) and the output projection.

``core`` maps (q, k, v, log gates, document keys) of the local tokens to the output, like
``Attention.core``: context parallelism replaces it with LASP-2 (plait/parallel/lasp2.py).
Generation keeps one (heads, d_k, d_v) state per layer in the cache instead of keys and values.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from plait.config import ModelConfig
from plait.models.linear_attention import chunked, document_resets, math_dtype, recurrent
from plait.models.norm import RMSNorm


def use_compiled(kernel: str, device: torch.device) -> bool:
    """``model.gla_kernel``: compiled chunk math when asked, or by default on CUDA."""
    return kernel == "compiled" or (kernel == "auto" and device.type == "cuda")


def gla_core(q, k, v, g, keys, chunk: int, kernel: str) -> torch.Tensor:
    """One process's GLA over whole sequences, documents kept apart by ``keys``."""
    out, _ = chunked(q, k, v, g, document_resets(keys), chunk, compiled=use_compiled(kernel, q.device))
    return out


class GatedLinearAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_k, self.head_v = cfg.gla_dims()
        heads = cfg.n_heads
        self.gate_norm, self.chunk = cfg.gla_gate_norm, cfg.gla_chunk
        self.wq = nn.Linear(cfg.dim, heads * self.head_k, bias=False)
        self.wk = nn.Linear(cfg.dim, heads * self.head_k, bias=False)
        self.wv = nn.Linear(cfg.dim, heads * self.head_v, bias=False)
        self.gate_down = nn.Linear(cfg.dim, cfg.gla_gate_rank, bias=False)
        self.gate_up = nn.Linear(cfg.gla_gate_rank, heads * self.head_k, bias=True)
        self.wr = nn.Linear(cfg.dim, heads * self.head_v, bias=False)  # the output gate
        self.out_norm = RMSNorm(self.head_v, cfg.norm_eps)
        self.wo = nn.Linear(heads * self.head_v, cfg.dim, bias=False)
        self.core = functools.partial(gla_core, chunk=cfg.gla_chunk, kernel=cfg.gla_kernel)

    def forward(self, x, cos, sin, keys, cache=None, layer: int = 0):
        batch, seq, _ = x.shape
        # -1 heads: tensor parallelism shards them without a change here.
        heads = lambda t, width: t.view(batch, seq, -1, width).transpose(1, 2)  # noqa: E731
        q = heads(self.wq(x), self.head_k) * self.head_k ** -0.5
        k = heads(self.wk(x), self.head_k)
        v = heads(self.wv(x), self.head_v)
        gate = self.gate_up(self.gate_down(x))
        g = heads(F.logsigmoid(gate.to(math_dtype(gate))) / self.gate_norm, self.head_k)  # log α, fp32
        if cache is None:
            out = self.core(q, k, v, g, keys)
        else:
            out = self._step(q, k, v, g, cache, layer)
        out = self.out_norm(out.transpose(1, 2))  # (batch, seq, heads, d_v)
        out = out * F.silu(self.wr(x)).view(batch, seq, -1, self.head_v)
        return self.wo(out.reshape(batch, seq, -1))

    def _step(self, q, k, v, g, cache, layer: int) -> torch.Tensor:
        """Generation: continue from the layer's state; one token is one recurrence step."""
        state = cache.states.get(layer)
        if q.shape[2] == 1:
            out, state = recurrent(q, k, v, g, state=state)
        else:
            out, state = chunked(q, k, v, g, chunk=self.chunk, state=state)
        cache.states[layer] = state
        return out.to(v.dtype)
