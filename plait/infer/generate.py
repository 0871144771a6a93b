"""Autoregressive sampling with a KV cache: temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import torch

from plait.models.llama import KVCache, Llama


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Pick one token id per row of ``logits`` (batch, vocab). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first stays.
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(
    model: Llama,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 0.95,
    seed: int = 0,
    eos_id: int | None = None,
) -> list[int]:
    """Return the generated token ids (prompt and the final ``eos_id`` excluded).

    The prompt is run once to fill the cache; each new token then costs one single-token
    forward over the cached keys and values.
    """
    if not prompt_ids:
        raise ValueError("the prompt must have at least one token")
    model.eval()
    device = model.inv_freq.device
    limit = min(model.cfg.max_seq_len, len(prompt_ids) + max_new_tokens)
    prompt_ids = prompt_ids[-(limit - 1):] if len(prompt_ids) >= limit else prompt_ids
    dtype = model.tok_embeddings.weight.dtype
    cache = KVCache.empty(model.cfg, 1, limit, device, dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens = torch.tensor([prompt_ids], device=device)
    out: list[int] = []
    while cache.length + tokens.shape[1] <= limit and len(out) < max_new_tokens:
        logits = model(tokens, cache=cache)[:, -1]
        next_id = sample_next(logits.cpu(), temperature, top_k, top_p, gen)
        token = int(next_id[0])
        if eos_id is not None and token == eos_id:
            break
        out.append(token)
        tokens = next_id.view(1, 1).to(device)
    return out
