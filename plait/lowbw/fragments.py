"""Fragments: which of this rank's weights travel together in one outer sync.

Streaming DiLoCo syncs the model in P pieces at different steps, so each exchange carries 1/P
of the bytes. Transformer block i belongs to fragment i mod P (a strided pattern: every
fragment has blocks from the bottom to the top of the network). The other weights (embedding,
final norm, output) are cut by rows into P near-equal slices, one per fragment, so the
fragments are equal in size when the block count divides by P. Plain DiLoCo and CO2 use P = 1.

A fragment works on this rank's local tensors: the FSDP/TP shard of a DTensor, this stage's
blocks under pipeline parallelism. Its peers in the other workers hold the same pieces, so
the flat vectors line up element for element across the sync group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def local_view(param: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores for ``param`` (writes to it change the parameter)."""
    return param.to_local() if isinstance(param, DTensor) else param.data


@dataclass
class Fragment:
    index: int
    names: list[str] = field(default_factory=list)
    views: list[torch.Tensor] = field(default_factory=list)  # row slices of local tensors

    @property
    def numel(self) -> int:
        return sum(v.numel() for v in self.views)

    @property
    def shapes(self) -> list[torch.Size]:
        return [v.shape for v in self.views]

    @torch.no_grad()
    def read(self) -> torch.Tensor:
        """The fragment's current local weights as one flat float32 vector in CPU memory (a
        copy: the outer state lives there)."""
        if not self.views:
            return torch.zeros(0)
        return torch.cat([v.detach().reshape(-1).float().cpu() for v in self.views])

    @torch.no_grad()
    def write(self, flat: torch.Tensor) -> None:
        """Copy ``flat`` (as returned by read) back into the weights."""
        offset = 0
        for view in self.views:
            n = view.numel()
            view.copy_(flat[offset:offset + n].view(view.shape).to(view.device, view.dtype))
            offset += n


def block_index(name: str) -> int | None:
    """The transformer block a parameter name belongs to, or None for the other weights."""
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def split_fragments(parts: list[nn.Module], count: int) -> list[Fragment]:
    """This rank's weights cut into ``count`` fragments (see the module docstring)."""
    fragments = [Fragment(index) for index in range(count)]
    seen: set[int] = set()
    for part in parts:
        for name, param in part.named_parameters():
            if id(param) in seen:  # tied weights are synced once
                continue
            seen.add(id(param))
            local = local_view(param)
            block = block_index(name)
            if block is not None:
                fragments[block % count].names.append(name)
                fragments[block % count].views.append(local)
                continue
            rows = local.reshape(-1, local.shape[-1]) if local.dim() > 1 else local.reshape(-1)
            for index in range(count):
                begin, end = rows.shape[0] * index // count, rows.shape[0] * (index + 1) // count
                if end > begin:
                    fragments[index].names.append(f"{name}[{begin}:{end}]")
                    fragments[index].views.append(rows[begin:end])
    return fragments
