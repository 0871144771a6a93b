"""Where each plait parameter lies in a Hugging Face checkpoint, and reading any block of it.

Most plait parameters are one HF tensor under another name (``tok_embeddings.weight`` is
``model.embed_tokens.weight``). The stacked expert weights (experts, rows, cols) are one slab
per expert instead: a whole per-expert tensor (``...experts.3.gate_proj.weight``), or one
expert's rows of transformers' fused tensor (``...experts.gate_up_proj``: the gate rows, then
the up rows). :mod:`plait.checkpoint.hf_mapping` builds the placements and checks them against
a checkpoint's names and shapes; :meth:`Placement.read` reads a block through them from
in-memory tensors and from safetensors slices alike, so loading a whole model and filling one
rank's shards share one read path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# A block of a tensor: one slice(start, stop) per dimension, in the tensor's own coordinates.
Region = tuple[slice, ...]


@dataclass(frozen=True)
class Slab:
    """One HF tensor, or one expert of a fused expert tensor (``expert`` set)."""

    name: str
    expert: int | None = None  # the index along the fused tensor's first (experts) dim
    row: int = 0  # where this expert's rows start along the fused tensor's dim 1 (up after gate)


@dataclass(frozen=True)
class Placement:
    """Where one plait parameter of ``shape`` lies: in ``slabs[0]``, or when ``stacked`` in
    ``slabs[e]`` for expert ``e`` (the parameter's dim 0)."""

    shape: tuple[int, ...]
    slabs: tuple[Slab, ...]
    stacked: bool = False

    def hf_shape(self) -> tuple[int, ...]:
        """The shape each of ``slabs`` has as a tensor of its own (a per-expert view)."""
        return self.shape[1:] if self.stacked else self.shape

    def read(self, region: Region, tensor_of: Callable[[str], Any]) -> torch.Tensor:
        """The block ``region`` of this parameter. ``tensor_of(hf_name)`` gives something that
        slicing reads from: a tensor, or a safetensors slice that reads only those bytes.

        Only the experts inside ``region`` are read, and of a fused tensor one slice covers
        each run of consecutive experts. Returns a tensor in the checkpoint's dtype."""
        if not self.stacked:
            return tensor_of(self.slabs[0].name)[region]
        experts, rest = region[0], region[1:]
        if experts.start >= experts.stop:  # no expert: one expert's block, emptied, has the dtype
            return self.read((slice(0, 1), *rest), tensor_of)[:0].clone()
        blocks = []
        for run in _runs(self.slabs[experts]):
            head = run[0]
            if head.expert is None:
                blocks += [tensor_of(slab.name)[rest].unsqueeze(0) for slab in run]
            else:
                rows = slice(rest[0].start + head.row, rest[0].stop + head.row)
                fused = (slice(head.expert, head.expert + len(run)), rows, *rest[1:])
                blocks.append(tensor_of(head.name)[fused])
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def split(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """HF name -> tensor for plait's whole ``tensor``, one per slab. An expert is a copy:
        safetensors refuses to write tensors that share storage."""
        if not self.stacked:
            return {self.slabs[0].name: tensor}
        return {slab.name: tensor[e].clone() for e, slab in enumerate(self.slabs)}


def whole(shape: tuple[int, ...]) -> Region:
    """The region covering all of a tensor of ``shape``."""
    return tuple(slice(0, n) for n in shape)


def _runs(slabs: tuple[Slab, ...]) -> list[list[Slab]]:
    """``slabs`` cut into runs that one slice reads: consecutive experts of one fused tensor at
    the same rows. A per-expert tensor is a run of its own."""
    runs: list[list[Slab]] = []
    for slab in slabs:
        last = runs[-1][-1] if runs else None
        if (
            last is not None
            and last.expert is not None
            and slab.expert == last.expert + 1
            and (slab.name, slab.row) == (last.name, last.row)
        ):
            runs[-1].append(slab)
        else:
            runs.append([slab])
    return runs
