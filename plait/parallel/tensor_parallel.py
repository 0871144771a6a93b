"""Tensor + sequence parallelism on the ``tp`` mesh dim with DTensor (Megatron-style).

What is sharded, per block, over t ranks:
- attention: wq/wk/wv column-wise (each rank holds n_heads/t query heads and n_kv_heads/t KV
  heads), wo row-wise; the MLP: w1/w3 column-wise, w2 row-wise;
- GLA blocks: the same, plus their gates and output norm (``gla_plan``);
- between blocks the residual stream is sequence-sharded (sequence parallel): norms run on
  seq/t tokens, and each column-wise input is all-gathered along the sequence;
- the embedding is split by vocabulary rows, the output by vocabulary columns, and the loss is
  computed on vocabulary-sharded logits (loss parallel) so full logits are never gathered.

Communication per block and micro-batch, for activations of b·s·h elements: forward one
all-gather and one reduce-scatter of b·s·h each for attention and again for the MLP
((t−1)/t of the payload on the wire each); backward the same again.
"""

from __future__ import annotations

from torch import nn

from plait.models.gla import GatedLinearAttention
from plait.models.moe import MoE
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool = True) -> None:
    """Shard ``model`` (a Llama, or a pipeline stage of one) over ``tp_mesh`` in place.

    With ``loss_parallel`` the output stays a vocabulary-sharded DTensor; the caller computes
    cross-entropy inside ``torch.distributed.tensor.parallel.loss_parallel()``.
    """
    top: dict[str, object] = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    if top:
        parallelize_module(model, tp_mesh, top)
    for block in model.layers.values():
        plan = {
            "attention_norm": SequenceParallel(),
            # (x, cos, sin, mask, cache, layer): only x is sequence-sharded; gather it.
            "attention": PrepareModuleInput(
                input_layouts=(Shard(1), None, None, None, None, None),
                desired_input_layouts=(Replicate(), None, None, None, None, None),
            ),
            **{f"attention.{name}": ColwiseParallel() for name in ("wq", "wk", "wv")},
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
        }
        if isinstance(block.attention, GatedLinearAttention):
            plan.update(gla_plan())
        if isinstance(block.feed_forward, MoE):
            # Experts are not split over tp: every tp rank routes the whole (gathered)
            # sequence through the same replicated MoE, so their gradients agree without a
            # reduction, and takes back its part of the sequence.
            plan["feed_forward"] = PrepareModuleInputOutput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
                output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),), use_local_output=True,
            )
        else:
            plan.update({
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
                "feed_forward.w3": ColwiseParallel(),
            })
        parallelize_module(block, tp_mesh, plan)


def gla_plan() -> dict[str, object]:
    """GLA's extra modules, heads split like q/k/v: the gate's low-rank down-projection split by
    rank and gathered (every head's gate needs all of it), its up-projection and the output
    gate column-wise, and the per-head output norm run on this rank's heads (dim 2) with its
    shared weight replicated, its gradient summed over the tp ranks."""
    return {
        "attention.gate_down": ColwiseParallel(output_layouts=Replicate()),
        "attention.gate_up": ColwiseParallel(),
        "attention.wr": ColwiseParallel(),
        "attention.out_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
    }
