"""How a sequence is cut over the ``cp`` ranks, and the one collective every cp mode shares:
an all-gather of equal-sized rows from every cp rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class SequenceLayout:
    """How a sequence is cut into chunks and which chunks each of the ``cp`` ranks holds."""

    cp: int
    zigzag: bool = True

    @property
    def n_chunks(self) -> int:
        return 2 * self.cp if self.zigzag else self.cp

    def rank_chunks(self, rank: int) -> tuple[int, ...]:
        return (rank, 2 * self.cp - 1 - rank) if self.zigzag else (rank,)

    def token_index(self, rank: int, seq_len: int, device=None) -> torch.Tensor:
        """Global positions of rank ``rank``'s tokens, in its local order."""
        length = seq_len // self.n_chunks
        return torch.cat([torch.arange(c * length, (c + 1) * length, device=device) for c in self.rank_chunks(rank)])

    def shard(self, tensor: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank ``rank``'s part of a (batch, seq, ...) tensor."""
        return tensor.index_select(1, self.token_index(rank, tensor.shape[1], tensor.device))


# torch 2.13 renamed all_gather_into_tensor (the old name warns); older versions lack the new one.
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def all_gather_rows(local: torch.Tensor, size: int, group: dist.ProcessGroup) -> torch.Tensor:
    """(rows, ...) from each of the ``size`` ranks of ``group`` -> (size * rows, ...), in rank
    order (gloo gathers along dim 0 only)."""
    gathered = torch.empty((size * local.shape[0],) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
    _all_gather(gathered, local.contiguous(), group=group)
    return gathered
