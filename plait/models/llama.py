"""Llama-family decoder (Llama 2/3, Qwen2, Mistral) in plain PyTorch, with no parallel code.

RoPE uses the rotate-half layout of Hugging Face checkpoints, so weights load without
permutation. Packed sequences carry ``position_ids`` that restart at 0 at every document; the
document keys are derived from them so no token attends across a document boundary
(plait/models/attention.py picks the kernel).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from plait.config import ModelConfig
from plait.models.attention import cached_attention, causal_attention, document_keys
from plait.models.init import InitWeights, full_region
from plait.models.gla import GatedLinearAttention
from plait.models.moe import MoE
from plait.models.norm import RMSNorm


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in fp32, with Llama-3 scaling when configured."""
    head_dim = cfg.dim // cfg.n_heads
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if cfg.rope_scaling != "llama3":
        return inv_freq
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
    low_wavelen = cfg.rope_original_max_seq_len / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_max_seq_len / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
    smooth = (cfg.rope_original_max_seq_len / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
    )
    blended = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); cos/sin: (batch, seq, head_dim)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


@dataclass
class KVCache:
    """Generation's memory: preallocated keys/values, one (batch, kv_heads, max_len, head_dim)
    pair per softmax layer (None for GLA layers), one GLA state per GLA layer (``states``,
    filled by the first forward), and ``length`` tokens already seen."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    length: int = 0
    states: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device, dtype) -> "KVCache":
        kv_heads = cfg.n_kv_heads or cfg.n_heads
        shape = (batch, kv_heads, max_len, cfg.dim // cfg.n_heads)
        make = lambda mixer: torch.zeros(shape, device=device, dtype=dtype) if mixer == "softmax" else None  # noqa: E731
        return cls([make(m) for m in cfg.mixers()], [make(m) for m in cfg.mixers()])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)
        # (q, k, v, document keys) -> output; context parallelism replaces it.
        self.core = functools.partial(causal_attention, kernel=cfg.attention_kernel)

    def forward(self, x, cos, sin, keys, cache: KVCache | None = None, layer: int = 0):
        q, k, v = self.project(x, cos, sin)
        out = self.core(q, k, v, keys) if cache is None else self._cached_attention(q, k, v, cache, layer)
        return self.output(out)

    def project(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per token: queries, keys and values (batch, heads, seq, head_dim), RoPE applied."""
        batch, seq, _ = x.shape
        # -1 instead of the head count lets tensor parallelism shard heads without a change here.
        q = self.wq(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """Per token: the heads' outputs (batch, heads, seq, head_dim) back to the model width."""
        batch, _, seq, _ = out.shape
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))

    @staticmethod
    def _cached_attention(q, k, v, cache: KVCache, layer: int) -> torch.Tensor:
        """Generation: append k/v to the cache, attend over everything cached so far."""
        start, seq = cache.length, q.shape[2]
        cache.keys[layer][:, :, start : start + seq] = k
        cache.values[layer][:, :, start : start + seq] = v
        return cached_attention(q, cache.keys[layer][:, :, : start + seq], cache.values[layer][:, :, : start + seq], start)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm residual block; its token mixer is softmax ``Attention`` or GLA (``mixer``)."""

    def __init__(self, cfg: ModelConfig, mixer: str = "softmax"):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = GatedLinearAttention(cfg) if mixer == "gla" else Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = MoE(cfg) if cfg.moe_experts else FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, keys, cache=None, layer=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, keys, cache, layer)
        return self.mlp_residual(x)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """The second half of the block, token by token."""
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """Decoder-only transformer. ``forward`` returns logits (batch, seq, vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (> 0) before building the model")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # Keyed by the layer's global index, so a pipeline stage that keeps layers 4..7 still
        # names them layers.4..layers.7 and checkpoints move between layouts.
        self.layers = nn.ModuleDict({str(i): Block(cfg, mixer) for i, mixer in enumerate(cfg.mixers())})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        # position_ids -> the document keys every block's attention gets (plait/models/attention.py);
        # context parallelism replaces it with one that knows the other ranks' parts of the sequence.
        self.attention_mask = document_keys

    def _apply(self, fn, recurse=True):
        # Keep the RoPE frequencies fp32 whatever dtype the weights are cast to: bf16 frequencies
        # put positions in the thousands radians off.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.cfg).to(self.inv_freq.device)
        return self

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init from ``seed``: normal(0, init_std) for matrices, output
        projections scaled by 1/sqrt(2·layers) (GPT-2), zero biases, unit norms, each value
        the same whatever layout later holds it (:mod:`plait.models.init`). Also (re)computes
        the RoPE buffer, which a meta-device build leaves empty."""
        source = init_source(self.cfg, seed)
        for name, param in self.named_parameters():
            param.copy_(source(name, full_region(param.shape)))
        self.inv_freq = rope_inv_freq(self.cfg).to(self.inv_freq.device)

    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_mask: bool = True,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Token ids (batch, seq) -> logits (batch, seq, vocab).

        A pipeline stage may lack the embedding (it then receives hidden states instead of
        ids) or the final norm and output (it then returns hidden states).
        """
        batch, seq = input_ids.shape[:2]
        start = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + seq, device=input_ids.device).expand(batch, seq)
        keys = self.attention_mask(position_ids) if doc_mask and cache is None else None
        h = self.tok_embeddings(input_ids) if self.tok_embeddings is not None else input_ids
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        for name, layer in self.layers.items():
            h = layer(h, cos, sin, keys, cache, int(name))
        if cache is not None:
            cache.length += seq
        if self.norm is None:
            return h
        h = self.norm(h)
        if self.output is None:
            return F.linear(h, self.tok_embeddings.weight)
        return self.output(h)


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int = 0) -> Llama:
    """Build on the meta device (no memory touched), then materialize on ``device`` and init."""
    with torch.device("meta"):
        model = Llama(cfg)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


def model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor], device: str | torch.device = "cpu") -> Llama:
    """A model holding the tensors of ``state`` themselves (moved to ``device``), built on the
    meta device so no second copy of the weights is ever allocated."""
    with torch.device("meta"):
        model = Llama(cfg)
    model.load_state_dict({name: tensor.to(device) for name, tensor in state.items()}, assign=True)
    model.inv_freq = rope_inv_freq(cfg).to(device)  # non-persistent buffer, fp32 like init
    return model


def init_source(cfg: ModelConfig, seed: int) -> InitWeights:
    """The weight source of a fresh run of ``cfg``: any region of any parameter's initial value."""
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in Llama(cfg).named_parameters()}
    return InitWeights(cfg, seed, shapes)


def count_params(model: nn.Module, include_embedding: bool = True) -> int:
    """Number of parameters (elements); tied weights counted once."""
    total = sum(p.numel() for p in model.parameters())
    if not include_embedding and isinstance(model, Llama):
        total -= model.tok_embeddings.weight.numel()
    return total
