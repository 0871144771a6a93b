"""The layout recipe for the Llama family: pipeline split, then per stage TP → expert
parallel → context parallel → activation checkpointing → compile → data parallel
(FSDP2/HSDP or DDP). One function, read top to bottom."""

from __future__ import annotations

import torch
from torch import nn

from plait.config import JobConfig
from plait.parallel.recompute import apply_activation_checkpointing
from plait.parallel.context_parallel import apply_context_parallel
from plait.parallel.data_parallel import apply_data_parallel
from plait.parallel.dims import ParallelDims
from plait.parallel.expert_parallel import apply_expert_parallel
from plait.parallel.pipeline import build_pipeline
from plait.parallel.tensor_parallel import apply_tensor_parallel


def parallelize_llama(
    model: nn.Module, dims: ParallelDims, cfg: JobConfig, device: torch.device
) -> tuple[list[nn.Module], list[int]]:
    """Apply the layout of ``dims`` to ``model`` (materialized and initialized on every rank).

    Returns this rank's model parts (one per pipeline stage it holds; ``[model]`` without
    pipeline parallelism) and their global stage ids.
    """
    if dims.pp_enabled:
        parts, ids = build_pipeline(model, cfg, dims.local_rank("pp"), dims.group("pp"), device)
    else:
        parts, ids = [model], [0]
    for part in parts:
        if dims.tp_enabled:
            apply_tensor_parallel(part, dims.submesh("tp"), loss_parallel=True)
        if dims.ep > 1:
            apply_expert_parallel(part, dims.submesh("ep"))
        if dims.cp_enabled:
            apply_context_parallel(part, dims, cfg)
        apply_activation_checkpointing(part, cfg.train.activation_checkpointing, cfg.train.ac_every)
        if cfg.train.compile:
            for block in part.layers.values():
                block.compile()  # in place: parameter names (and checkpoints) stay the same
        apply_data_parallel(part, dims, list(part.layers.values()), cfg.parallel.zero)
    return parts, ids
