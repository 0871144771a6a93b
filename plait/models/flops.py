"""The model's FLOP and parameter accounting, in one place, from its ModelConfig alone.

Everything that weighs compute by the model's shape asks here: the MFU in metrics
(``flops_per_token``), the data balancer's cost of a packed sequence (``forward_coefficients``)
and the pipeline's stage split (``layer_costs``). The counts are per token and per
multiply-add of a weight (2 FLOPs forward, 6 forward + backward). Embedding lookups, norms and
activations are left out. (How long that compute takes on some hardware is the planner's
question: plait/plan/.)
"""

from __future__ import annotations

from plait.config import ModelConfig


def mixer_matmul_params(cfg: ModelConfig, mixer: str = "softmax") -> int:
    """Weights of one block's token mixer. Softmax: q/o (dim x dim), k/v (dim x kv_dim). GLA:
    q/k (dim x heads·d_k), v and the output gate (dim x heads·d_v), the gate's low-rank pair
    (dim x rank, rank x heads·d_k) and the output (heads·d_v x dim)."""
    if mixer == "gla":
        dk, dv = cfg.gla_dims()
        key, value = cfg.n_heads * dk, cfg.n_heads * dv
        return cfg.dim * (2 * key + 3 * value) + cfg.gla_gate_rank * (cfg.dim + key)
    kv_dim = (cfg.n_kv_heads or cfg.n_heads) * (cfg.dim // cfg.n_heads)
    return cfg.dim * (2 * cfg.dim + 2 * kv_dim)


def block_matmul_params(cfg: ModelConfig, mixer: str = "softmax") -> int:
    """Weights one transformer block multiplies each token by: its token mixer's
    (``mixer_matmul_params``) and SwiGLU's three dim x ffn_dim matrices; with experts, the
    router, the top-k experts' SwiGLUs and the shared expert instead. FLOPs per token = 2x this."""
    mixer_params = mixer_matmul_params(cfg, mixer)
    if not cfg.moe_experts:
        return mixer_params + 3 * cfg.dim * cfg.ffn_dim
    experts = cfg.moe_top_k * 3 * cfg.dim * (cfg.moe_ffn_dim or cfg.ffn_dim)
    shared = 3 * cfg.dim * cfg.moe_shared_ffn_dim + (cfg.dim if cfg.moe_shared_gate else 0)
    return mixer_params + cfg.dim * cfg.moe_experts + experts + shared


def output_matmul_params(cfg: ModelConfig) -> int:
    """Weights of the output layer (dim x vocab), each token's last matrix."""
    return cfg.dim * cfg.vocab_size


def attention_macs(cfg: ModelConfig, seq_len: int, mixer: str = "softmax") -> int:
    """Multiply-adds per token of one block's token mixing over a ``seq_len`` window. Softmax:
    Q.K and P.V, ``dim`` each per key (causal masking's half not subtracted). GLA, per head:
    its chunk's Q.K and A.V (chunk·(d_k + d_v)), the incoming state (d_k·d_v) and its update
    (d_k·d_v): independent of the window beyond one chunk."""
    if mixer == "gla":
        dk, dv = cfg.gla_dims()
        chunk = min(cfg.gla_chunk, seq_len)
        return cfg.n_heads * (chunk * (dk + dv) + 2 * dk * dv)
    return 2 * seq_len * cfg.dim


def _block_macs(cfg: ModelConfig, seq_len: int) -> list[int]:
    """Multiply-adds per token of each block: weights plus token mixing."""
    return [block_matmul_params(cfg, m) + attention_macs(cfg, seq_len, m) for m in cfg.mixers()]


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward, no recompute): 6 per weight multiply-add
    of every matrix including the output layer, plus token mixing: softmax attention's
    6·2·seq·dim per layer (half of it for causal masking is not subtracted: this is the usual
    PaLM-style count), GLA's chunk and state terms."""
    return 6.0 * (sum(_block_macs(cfg, seq_len)) + output_matmul_params(cfg))


def forward_coefficients(cfg: ModelConfig) -> tuple[float, float]:
    """(attn_coef, linear_coef) of a model, in forward FLOPs (n_kv_heads 0 means n_heads), such
    that a document of s tokens costs ``attn_coef * s**2 + linear_coef * s``.

    linear_coef: FLOPs per token, ``2 * block_matmul_params`` per layer (for a dense block
    ``2 * (dim * (2 dim + 2 kv_dim) + 3 dim ffn_dim)``: q/o projections dim x dim, k/v
    projections dim x kv_dim, SwiGLU's three dim x ffn matmuls), plus GLA layers' token mixing,
    which is per token. attn_coef: FLOPs per squared token of one document, softmax layers
    only: causal attention has ~s**2/2 (query, key) pairs, each costing 2 dim for Q.K and 2 dim
    for P.V, so ``2 dim s**2`` per softmax layer. Embedding, LM head and norms are left out
    (they are per token, so they only scale linear_coef a little). Backward is ~2x forward for
    both, so the ratio is the same for training.
    """
    mixers = cfg.mixers()
    linear = 2.0 * sum(block_matmul_params(cfg, m) for m in mixers)
    linear += 2.0 * sum(attention_macs(cfg, cfg.gla_chunk, m) for m in mixers if m == "gla")
    attn = 2.0 * cfg.dim * mixers.count("softmax")
    return attn, linear


def layer_costs(cfg: ModelConfig, seq_len: int) -> tuple[list[float], float, float]:
    """Relative compute cost of each block, of the embedding and of the norm + output layer,
    in multiply-adds per token over ``seq_len``-token windows: a block's matrices plus its
    token mixing; the output layer dim·vocab; the embedding is a lookup and costs ~nothing."""
    return [float(c) for c in _block_macs(cfg, seq_len)], 0.0, float(output_matmul_params(cfg))
