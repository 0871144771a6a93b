"""The layout recipe for the Llama family, on the meta device: pipeline split, then per stage
TP → expert parallel → context parallel → activation checkpointing (or token-wise recompute) →
activation offload → compile → FSDP2/HSDP (with CPU offload);
then each rank materializes only its shards from a weight source; DDP wraps last. One
function, read top to bottom."""

from __future__ import annotations

import torch
from torch import nn

from plait.config import JobConfig
from plait.models.llama import Llama
from plait.parallel.context_parallel import apply_context_parallel
from plait.parallel.data_parallel import (
    offload_policy, precision_policy, replicate_data_parallel, shard_data_parallel, uses_fsdp,
)
from plait.parallel.dims import ParallelDims
from plait.parallel.expert_parallel import apply_expert_parallel
from plait.parallel.materialize import WeightSource, materialize
from plait.parallel.pipeline import build_pipeline
from plait.parallel.recompute import apply_activation_checkpointing
from plait.parallel.token_recompute import apply_tokenwise_recompute
from plait.parallel.activation_offload import apply_activation_offload
from plait.parallel.tensor_parallel import apply_tensor_parallel


def parallelize_llama(
    cfg: JobConfig, dims: ParallelDims, device: torch.device, weights: WeightSource
) -> tuple[list[nn.Module], list[int]]:
    """Build this rank's part of the model for the layout of ``dims`` and fill it from
    ``weights`` (:mod:`plait.parallel.materialize`); no rank allocates a whole model.

    Returns this rank's model parts (one per pipeline stage it holds; ``[model]`` without
    pipeline parallelism) and their global stage ids.
    """
    if dims.pp_enabled:
        parts, ids = build_pipeline(cfg, dims.local_rank("pp"))
    else:
        with torch.device("meta"):
            parts, ids = [Llama(cfg.model)], [0]
    offload = cfg.memory.offload
    fsdp = uses_fsdp(dims, cfg.parallel.zero, offload)
    for part in parts:
        if dims.tp_enabled:
            apply_tensor_parallel(part, dims.submesh("tp"), loss_parallel=True)
        if dims.ep > 1:
            apply_expert_parallel(part, dims.submesh("ep"))
        if dims.cp_enabled:
            apply_context_parallel(part, dims, cfg)
        apply_activation_checkpointing(part, cfg.train.activation_checkpointing, cfg.train.ac_every)
        apply_tokenwise_recompute(part, cfg.memory.recompute_fraction)
        # Hooks around the block, outside checkpointing: kept as the stage's (for its ledger).
        part.activation_offload = apply_activation_offload(part, cfg.memory.activation_offload,
                                                           cfg.model.n_layers, device)
        if cfg.train.compile:
            for block in part.layers.values():
                block.compile()  # in place: parameter names (and checkpoints) stay the same
        if fsdp:
            policy = precision_policy(cfg.train.dtype, cfg.train.reduce_dtype)
            shard_data_parallel(part, dims, list(part.layers.values()), cfg.parallel.zero, policy,
                                offload_policy(offload, device))
        materialize(part, device, weights, on_host=offload == "params")
        if not fsdp:
            replicate_data_parallel(part, dims)
    return parts, ids
