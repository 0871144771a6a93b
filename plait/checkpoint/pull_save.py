"""Writing a DCP checkpoint whose tensors are read only as DCP writes them, one at a time.

``plait convert`` turns a Hugging Face folder into a plait checkpoint of a model that may not
fit in memory. DCP saves a state dict; here that state dict holds meta-device placeholders
(shape and dtype only), and :class:`PullPlanner` reads each tensor from a weight source when
the writer asks for its data (``resolve_data``). The writer keeps every tensor of one file
alive until that file is closed, so :func:`save_pulled` writes one file per tensor: at most one
tensor is in memory at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItem

# A weight source: (name, region) -> the tensor of that block (see plait.checkpoint.hf_source).
Source = Callable[[str, tuple[slice, ...]], torch.Tensor]


class PullPlanner(DefaultSavePlanner):
    """``DefaultSavePlanner`` that reads the data of the state dict entry ``<prefix><name>``
    from ``source(name, region)`` when DCP writes it, cast to the placeholder's dtype."""

    def __init__(self, source: Source, prefix: str = ""):
        super().__init__()
        self.source = source
        self.prefix = prefix

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        chunk = write_item.tensor_data.chunk
        region = tuple(slice(start, start + size) for start, size in zip(chunk.offsets, chunk.sizes))
        tensor = self.source(write_item.index.fqn.removeprefix(self.prefix), region)
        return tensor.to(write_item.tensor_data.properties.dtype)


def save_pulled(placeholders: dict[str, torch.Tensor], source: Source, folder: str, key: str) -> None:
    """Single process: ``dcp.save({key: placeholders})`` into ``folder``, the data of entry
    ``name`` read from ``source(name, region)`` as it is written. ``placeholders`` give only
    each tensor's shape and dtype (meta tensors)."""
    writer = dcp.FileSystemWriter(folder, single_file_per_rank=False)
    dcp.save({key: placeholders}, storage_writer=writer, planner=PullPlanner(source, f"{key}."))
