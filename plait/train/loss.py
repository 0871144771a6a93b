"""The training objective: summed token cross-entropy, normalized by the caller."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies (labels of -100 are not scored). Under tensor parallelism
    ``logits`` is vocabulary-sharded and this must run inside ``loss_parallel()``."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


def plain(value: torch.Tensor) -> torch.Tensor:
    """A DTensor (a loss under tensor parallelism) as a plain tensor; others unchanged."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
