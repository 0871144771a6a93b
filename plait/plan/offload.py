"""Time of the [memory] section's options: copies over the host link and AdamW on the host.

- offload = optimizer (ZeRO-Offload): each step the gradients the rank updates go to the host and
  the updated weights come back (their bytes over the host link, each way), and AdamW runs on the
  host at its memory bandwidth. Neither overlaps anything: they sit between the last backward and
  the next forward.
- offload = params (FSDP2 CPU offload): before each unit's all-gather, in forward and again in
  backward, its weight shard is copied to the device; after its reduce-scatter its gradient shard
  goes back. Prefetching one unit ahead hides a copy behind the previous block's compute, no
  more: what a copy takes beyond one block is exposed, and so is the first unit's (the root).
  The update runs on the host, as above, without the weight copies (the weights live there).
- activation offload: each offloaded block's saved tensors go to the host during its forward
  and come back during its backward, overlapped with that block's compute: max(0, copy -
  compute) per block and pass is exposed.

A CPU "host copy" is a memcpy on the thread that computes (``GpuSpec.host_async`` false), and
ranks that share cores have no spare core to copy with: there nothing overlaps.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.plan.compute import BlockCost
from plait.plan.hardware import GpuSpec
from plait.layout import Layout
from plait.plan.memory import offloaded_blocks, weight_and_state_bytes
from plait.plan.spec import PlanModel, PlanTrain

# Bytes AdamW moves per parameter on the host, besides reading the gradient and writing the
# weight in the training dtype: the fp32 master weight and the two fp32 moments read and written
# once each in a fused (or vectorized) CPU step, ~16 with the reads and writes overlapping the
# arithmetic.
HOST_ADAMW_STATE_BYTES = 16.0


@dataclass(frozen=True)
class OffloadTime:
    """Seconds per step: host-link copies not hidden behind compute, and AdamW on the host."""

    transfer_s: float = 0.0
    host_optimizer_s: float = 0.0


def host_copy_seconds(gpu: GpuSpec, nbytes: float) -> float:
    """One direction of the host link (PCIe; a memcpy on a CPU)."""
    return nbytes / gpu.host_link_bytes_per_s


def host_adamw_seconds(gpu: GpuSpec, params: float, dtype: str) -> float:
    """AdamW over ``params`` parameters on the host: memory-bound at its DRAM bandwidth share."""
    weight_b, _ = weight_and_state_bytes(dtype)
    return params * (HOST_ADAMW_STATE_BYTES + 2 * weight_b) / gpu.host_memory_bytes_per_s


def _exposed(gpu: GpuSpec, copy_s: float, compute_s: float) -> float:
    """What a copy overlapping ``compute_s`` of compute leaves on the critical path."""
    if gpu.host_async and gpu.core_share >= 1.0:
        return max(0.0, copy_s - compute_s)
    return copy_s


def params_offload_seconds(model: PlanModel, train: PlanTrain, layout: Layout, gpu: GpuSpec, block: BlockCost,
                           stage_shared: float, layers: int) -> float:
    """Exposed host copies of one micro-batch under offload = params (see the module doc)."""
    weight_b, _ = weight_and_state_bytes(train.dtype)
    shards = layout.dp * layout.cp
    unit = weight_b * (model.shared_block_params() / layout.tp / shards
                       + model.expert_params() / (layout.tp * layout.ep) / max(1, shards // layout.ep))
    root = weight_b * (stage_shared - layers * model.shared_block_params() / layout.tp) / shards
    unit_s, root_s = host_copy_seconds(gpu, unit), host_copy_seconds(gpu, root)
    backward = block.with_recompute(layout.recompute, layout.recompute_fraction) - block.forward_s
    weights_in = 2 * root_s + layers * (_exposed(gpu, unit_s, block.forward_s) + _exposed(gpu, unit_s, backward))
    grads_out = root_s + layers * _exposed(gpu, unit_s, backward)
    return weights_in + grads_out


def activation_offload_seconds(gpu: GpuSpec, block: BlockCost, layout: Layout, kept_bytes: float,
                               offloaded: int) -> float:
    """Exposed copies of one micro-batch's offloaded blocks: out in forward, back in backward."""
    if not offloaded:
        return 0.0
    copy_s = host_copy_seconds(gpu, kept_bytes)
    backward = block.with_recompute(layout.recompute, layout.recompute_fraction) - block.forward_s
    return offloaded * (_exposed(gpu, copy_s, block.forward_s) + _exposed(gpu, copy_s, backward))


def offload_time(model: PlanModel, train: PlanTrain, layout: Layout, gpu: GpuSpec, block: BlockCost,
                 kept_bytes: float, optimizer_params: float, stage_shared: float, micro_batches: int,
                 layers: int) -> OffloadTime:
    """Per-step cost of ``layout``'s memory options on the critical (first) pipeline stage.
    ``kept_bytes``: what one block keeps for one micro-batch; ``optimizer_params``: the
    parameters this rank's optimizer updates; ``stage_shared``: the stage's dense parameters."""
    weight_b, _ = weight_and_state_bytes(train.dtype)
    offloaded = offloaded_blocks(layout, model.n_layers, first=True) if layout.activation_offload else 0
    per_micro_batch = activation_offload_seconds(gpu, block, layout, kept_bytes, offloaded)
    per_step, host_optimizer = 0.0, 0.0
    if layout.offload == "params":
        per_micro_batch += params_offload_seconds(model, train, layout, gpu, block, stage_shared, layers)
    if layout.offload != "none":
        host_optimizer = host_adamw_seconds(gpu, optimizer_params, train.dtype)
    if layout.offload == "optimizer":  # gradients out, updated weights in
        per_step = 2 * host_copy_seconds(gpu, weight_b * optimizer_params)
    return OffloadTime(micro_batches * per_micro_batch + per_step, host_optimizer)
