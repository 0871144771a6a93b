"""Materialize a model whose layout was applied on the meta device: each rank allocates only
its own shards and fills them from a weight source.

A weight source is ``source(name, region) -> tensor``: the values of parameter ``name`` (its
name in the single-process model) over ``region``, one ``slice`` per dimension in that
parameter's global coordinates. :class:`plait.models.init.InitWeights` generates a fresh
run's values that way and :mod:`plait.checkpoint.hf_source` reads them from a Hugging Face
checkpoint, so no rank builds a full copy of a tensor it does not own. The one place that holds
more than its own piece: a source producing the rows of a column-sharded tensor (tensor-parallel
row-wise weights) builds those rows whole, one block of rows at a time, before keeping its
columns.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from plait.models.init import Region

WeightSource = Callable[[str, Region], torch.Tensor]

# Elements asked of a source at once (64 MiB of fp32).
CHUNK_ELEMENTS = 1 << 24


def local_region(param: torch.Tensor) -> Region:
    """The block of the global tensor this rank holds of ``param``: the shard of a DTensor
    (tensor, expert or fully sharded data parallel, in any combination), else the whole."""
    if isinstance(param, DTensor):
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return tuple(slice(start, start + size) for start, size in zip(offset, shape))
    return tuple(slice(0, size) for size in param.shape)


@torch.no_grad()
def materialize(module: nn.Module, device: torch.device, source: WeightSource, on_host: bool = False) -> None:
    """Allocate ``module``'s parameters and buffers on ``device`` (only this rank's shards) and
    fill every parameter from ``source``. Buffers are recomputed by the model's own ``_apply``
    (RoPE frequencies), which ``to_empty`` runs. ``on_host``: the parameters stay in host memory
    (FSDP2's CPU offload copies them in for each unit's compute); buffers go to ``device``."""
    module.to_empty(device=torch.device("cpu") if on_host else device)
    if on_host:
        for owner in module.modules():
            for key, buffer in owner._buffers.items():
                if buffer is not None:
                    owner._buffers[key] = buffer.to(device)
    for name, param in module.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        if local.numel() == 0:  # an uneven shard can be empty
            continue
        region = local_region(param)
        if local.dim() == 0:
            local.copy_(source(name, region))
            continue
        # A few rows at a time: the source's tensor is a temporary beside the shard, so a
        # bounded chunk keeps the peak at the shards plus CHUNK_ELEMENTS, not plus a tensor.
        rows = max(1, CHUNK_ELEMENTS // max(math.prod(local.shape[1:]), 1))
        for start in range(0, local.shape[0], rows):
            stop = min(start + rows, local.shape[0])
            first = region[0].start
            values = source(name, (slice(first + start, first + stop), *region[1:]))
            if tuple(values.shape) != (stop - start, *local.shape[1:]):
                raise ValueError(f"weight source gave {name} the shape {tuple(values.shape)} "
                                 f"for rows {first + start}..{first + stop} of {tuple(local.shape)}")
            local[start:stop].copy_(values)
