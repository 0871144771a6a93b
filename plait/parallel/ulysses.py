"""Ulysses (DeepSpeed-Ulysses) redistribution: sequence-sharded ⇄ head-sharded attention inputs.

Before attention, each of the u ranks holds all heads for 1/u of the tokens; one all-to-all
per tensor turns that into 1/u of the heads for all the group's tokens, attention runs
locally, and one all-to-all turns the output back. Four all-to-alls per layer (q, k, v, out),
each moving (u - 1)/u of a (tokens x heads x head_dim) tensor per rank, whatever the sequence
length's split. Keys/values with fewer heads than u (GQA/MQA) are repeated first so every
rank gets the KV head its query heads use.
"""

from __future__ import annotations

import torch

from plait.parallel.all_to_all import all_to_all


def sequence_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(batch, heads, tokens, d) on each of u ranks -> (batch, heads / u, u * tokens, d): the
    group's tokens in rank order, this rank's share of the heads (rank i: block i of heads)."""
    u = group.size()
    batch, heads, tokens, dim = x.shape
    if heads < u:  # fewer KV heads than ranks: repeat each so the head blocks line up with q's
        x = x.repeat_interleave(u // heads, dim=1)
        heads = u
    send = x.reshape(batch, u, heads // u, tokens, dim).transpose(0, 1).contiguous()
    recv = all_to_all(send, group)  # (u: source rank, batch, heads / u, tokens, d)
    return recv.permute(1, 2, 0, 3, 4).reshape(batch, heads // u, u * tokens, dim)


def heads_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """The inverse of ``sequence_to_heads`` for the attention output: (batch, heads / u,
    u * tokens, d) -> (batch, heads, tokens, d) for this rank's tokens."""
    u = group.size()
    batch, local_heads, all_tokens, dim = x.shape
    tokens = all_tokens // u
    send = x.reshape(batch, local_heads, u, tokens, dim).permute(2, 0, 1, 3, 4).contiguous()
    recv = all_to_all(send, group)  # (u: source rank = head block, batch, heads / u, tokens, d)
    return recv.transpose(0, 1).reshape(batch, u * local_heads, tokens, dim)
