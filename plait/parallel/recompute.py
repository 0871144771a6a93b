"""Activation checkpointing of transformer blocks: trade backward compute for activation memory.

Modes (``train.activation_checkpointing``):

- ``none``: every activation is kept for backward.
- ``full``: each block keeps only its inputs; everything inside it is recomputed in backward
  (about one extra forward per step).
- ``selective``: blocks 0, every, 2·every, ... (``train.ac_every``) are checkpointed as in
  ``full``; the others keep their activations. A block's number is its global layer index, taken
  from its name in ``model.layers`` ("0", "1", ... in a ModuleList or a ModuleDict keyed by
  index), so a pipeline stage holding layers 4..7 picks the same layers as the whole model;
  a container whose names are not integers falls back to the position (from 0).
- ``op``: every block is checkpointed with a per-op policy: outputs of matmuls and attention
  (``aten.mm``/``addmm``/``bmm``/``linear``, the ``_scaled_dot_product_*attention*`` kernels) and
  of tensor-parallel reduce-scatter/all-reduce are saved; the cheap ops between them (norms,
  SiLU, RoPE, residual adds, casts, views) are recomputed. Most of the memory win for a small
  fraction of the recompute cost.

How it is applied: the block's ``forward`` is replaced, on the instance, by one that runs the
class's ``forward`` under non-reentrant :func:`torch.utils.checkpoint.checkpoint`. No wrapper
module is inserted, so parameter names and ``state_dict`` keys stay exactly those of the plain
model (checkpoints, tensor-parallel plans and FSDP are all applied by name), and the block
stays the module that FSDP2 ``fully_shard`` wraps. The documented order is tensor parallel →
activation checkpointing → compile → FSDP: tensor-parallel hooks on the block's submodules
run inside the checkpointed region and are recomputed with it; FSDP's hooks sit on the block
around it, and its pre-backward unshard happens before the block's recomputation.

Checkpointing is skipped when autograd is off (evaluation, generation) and whenever a KV cache
is passed, since recomputing would write the cache a second time at a moved offset.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective", "op")

_ATTR = "_plait_ac_mode"  # set on a checkpointed block: the mode it was wrapped with

# Ops whose outputs ``op`` mode saves. ``aten.linear`` is listed for completeness: it is
# composite and normally reaches the dispatcher as mm/addmm.
_SAVE_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::matmul",
    "aten::linear",
    "aten::_scaled_mm",
    # Packed documents' attention (plait/models/attention.py), one operator per block.
    "plait::document_attention",
    # Tensor parallel: keep the result of the forward collective rather than repeat it.
    "_c10d_functional::reduce_scatter_tensor",
    "_c10d_functional::all_reduce",
}


def _is_saved_op(op: Any) -> bool:
    name = getattr(op, "name", None)
    name = name() if callable(name) else str(op)
    base = name.split(".")[0]
    if base in _SAVE_OPS:
        return True
    # _scaled_dot_product_flash_attention(_for_cpu), _efficient_attention, _cudnn_attention, ...
    return base.startswith("aten::_scaled_dot_product_") and "attention" in base


def op_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective-checkpoint policy of ``op`` mode: save matmul/attention outputs, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if _is_saved_op(op) else CheckpointPolicy.PREFER_RECOMPUTE


def _op_context_fn():
    return create_selective_checkpoint_contexts(op_policy)


def checkpointed_indices(mode: str, every: int, n_layers: int) -> list[int]:
    """Global layer indices (0-based) of the blocks ``mode`` recomputes in an ``n_layers`` model."""
    _validate(mode, every)
    return [index for index in range(n_layers) if _picked(mode, every, index)]


def describe(mode: str, every: int, n_layers: int) -> str:
    """One-line summary, e.g. ``"selective (every 2): 3 of 6 blocks recomputed (0, 2, 4)"``."""
    picked = checkpointed_indices(mode, every, n_layers)
    if mode == "none":
        return f"none: activations of all {n_layers} blocks kept"
    if mode == "full":
        return f"full: {n_layers} of {n_layers} blocks recomputed, only block inputs kept"
    if mode == "selective":
        where = ", ".join(map(str, picked))
        return f"selective (every {every}): {len(picked)} of {n_layers} blocks recomputed ({where})"
    return f"op: {n_layers} of {n_layers} blocks, matmul/attention outputs kept, other ops recomputed"


def _uses_cache(args: tuple, kwargs: dict) -> bool:
    # Block.forward(x, cos, sin, mask, cache=None, layer=0)
    cache = kwargs["cache"] if "cache" in kwargs else (args[4] if len(args) > 4 else None)
    return cache is not None


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    inner = type(self).forward.__get__(self)
    if not torch.is_grad_enabled() or _uses_cache(args, kwargs):
        return inner(*args, **kwargs)
    if getattr(self, _ATTR) == "op":
        return checkpoint(inner, *args, use_reentrant=False, context_fn=_op_context_fn, **kwargs)
    return checkpoint(inner, *args, use_reentrant=False, **kwargs)


def _wrap(block: nn.Module, mode: str) -> None:
    if "forward" in block.__dict__ and not is_checkpointed(block):
        raise ValueError(f"{type(block).__name__} already has an instance-level forward; not wrapping it")
    setattr(block, _ATTR, mode)
    # A bound method of a module-level function: survives deepcopy/pickle with the right self.
    block.forward = types.MethodType(_checkpointed_forward, block)


def _unwrap(block: nn.Module) -> None:
    if is_checkpointed(block):
        del block.forward
        delattr(block, _ATTR)


def is_checkpointed(block: nn.Module) -> bool:
    return getattr(block, _ATTR, None) is not None


def _validate(mode: str, every: int) -> None:
    if mode not in MODES:
        raise ValueError(f"activation_checkpointing must be one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"ac_every must be an integer >= 1, got {every!r}")


def model_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(global layer index, block) for each child of ``model.layers``."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.Module):
        raise ValueError(f"{type(model).__name__} has no `layers` container of transformer blocks")
    children = list(layers.named_children())
    if all(name.isdigit() for name, _ in children):
        return [(int(name), block) for name, block in children]
    return [(position, block) for position, (_, block) in enumerate(children)]


def _picked(mode: str, every: int, index: int) -> bool:
    if mode == "none":
        return False
    return mode != "selective" or index % every == 0


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> None:
    """Checkpoint the blocks of ``model.layers`` (ModuleList or ModuleDict) in place.

    ``mode`` is none | full | selective | op (see the module doc); ``every`` picks the layers
    with global index 0, every, 2·every, ... in ``selective`` mode. Applying again replaces the
    previous mode. Module structure, parameter names and ``state_dict`` keys are unchanged.
    """
    _validate(mode, every)
    for index, block in model_blocks(model):
        _unwrap(block)
        if _picked(mode, every, index):
            _wrap(block, "op" if mode == "op" else "full")


def remove_activation_checkpointing(model: nn.Module) -> None:
    """Undo :func:`apply_activation_checkpointing`."""
    for _, block in model_blocks(model):
        _unwrap(block)


__all__ = [
    "MODES",
    "apply_activation_checkpointing",
    "checkpointed_indices",
    "describe",
    "is_checkpointed",
    "op_policy",
    "remove_activation_checkpointing",
]
