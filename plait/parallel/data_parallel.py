"""Data parallelism: DDP (replicate), FSDP2 (ZeRO-3) and HSDP on the ``dp_*`` mesh dims.

What each shards and sends per step, for Ψ parameters:
- DDP: nothing sharded; all-reduce of gradients, 2(n-1)/n·Ψ elements per rank.
- FSDP2: parameters, gradients and optimizer state sharded over ``dp_shard``; all-gather of
  parameters in forward and again in backward, reduce-scatter of gradients: 3(n-1)/n·Ψ.
- HSDP: FSDP2 inside ``dp_shard``, gradients all-reduced across ``dp_replicate``.
Context-parallel ranks join in (``dims.submesh("shard")`` and ``dims.submesh("grad")`` include cp): they
hold the same weights and each computes gradients from its part of the sequences.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable.replicate import replicate
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from plait.models.moe import MoE
from plait.parallel.dims import ParallelDims


def precision_policy(dtype: str, reduce_dtype: str) -> MixedPrecisionPolicy:
    """FSDP's mixed precision for ``train.dtype`` and ``train.reduce_dtype``: with bf16, the
    parameters are gathered and computed in bf16 (half the all-gather bytes) while the sharded
    master weights, the optimizer state and (by default) the gradient reduction stay fp32."""
    low = {"bf16": torch.bfloat16, "fp32": torch.float32}
    return MixedPrecisionPolicy(
        param_dtype=low[dtype] if dtype != "fp32" else None,
        reduce_dtype=low[reduce_dtype],
    )


def uses_fsdp(dims: ParallelDims, zero: int, offload: str = "none") -> bool:
    """Whether the layout shards parameters with FSDP2 (ZeRO-2/3) rather than replicating them.
    ``memory.offload = params`` uses FSDP2's CPU offload even where nothing is sharded (one
    process, DDP, or TP/PP alone): FSDP over the data-parallel ranks with a shard of size 1."""
    if offload == "params":
        return dims.mesh is not None and zero >= 2
    return dims.group("grad") is not None and dims.fsdp_enabled and zero >= 2


def offload_policy(offload: str, device: torch.device) -> OffloadPolicy:
    """FSDP2's policy for ``memory.offload``: sharded parameters, gradients and optimizer state
    in host memory for ``params`` (pinned for fast copies to a CUDA device), none otherwise."""
    if offload != "params":
        return OffloadPolicy()
    return CPUOffloadPolicy(pin_memory=device.type == "cuda")


def shard_data_parallel(model: nn.Module, dims: ParallelDims, blocks: list[nn.Module], zero: int,
                        policy: MixedPrecisionPolicy, offload: OffloadPolicy | None = None) -> None:
    """FSDP2 (ZeRO-2/3, HSDP) over ``model`` in place, on the meta device or not; ``blocks`` are
    sharded one by one so only one block's full parameters are live at a time under ZeRO-3.
    ``offload``: FSDP2's offload policy for every unit (``memory.offload = params``)."""
    mesh = dims.submesh("shard") or dims.fsdp_mesh  # the latter: size 1, for offload alone
    offload = offload or OffloadPolicy()
    for index, block in enumerate(blocks):
        # ZeRO-2 keeps every block gathered until backward; ZeRO-3 regathers all but the
        # last block, which backward needs at once.
        reshard = zero == 3 and index < len(blocks) - 1
        for moe in (m for m in block.modules() if isinstance(m, MoE)):
            _shard_experts(moe, dims, policy, reshard, offload)
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False, offload_policy=offload)


def replicate_data_parallel(model: nn.Module, dims: ParallelDims) -> None:
    """DDP over every data-parallel rank (ZeRO-0; ZeRO-1 adds its sharded optimizer
    separately), on a materialized model: DDP broadcasts rank 0's weights at wrap time."""
    if dims.group("grad") is not None:
        replicate(model, device_mesh=dims.submesh("grad"))


def _shard_experts(moe: MoE, dims: ParallelDims, policy: MixedPrecisionPolicy, reshard: bool,
                   offload: OffloadPolicy) -> None:
    """An MoE layer is its own FSDP unit (under TP its parameters are plain tensors, the rest
    of the block DTensors). With expert parallelism its experts are one more, sharded over
    edp (and replicated over dp_replicate) only: the ranks that hold the same experts."""
    if dims.ep > 1:
        fully_shard(moe.experts, mesh=dims.submesh("expert_shard"), mp_policy=policy, reshard_after_forward=reshard,
                    offload_policy=offload)
    fully_shard(moe, mesh=dims.submesh("shard") or dims.fsdp_mesh, mp_policy=policy, reshard_after_forward=reshard,
                offload_policy=offload)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip (False) or perform (True) the gradient reduction of the next backward; used so
    gradient accumulation reduces once per step instead of once per micro-batch."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(enabled)
