"""How many bytes autograd keeps for backward on the device: the saved-activation meter.

A :class:`torch.autograd.graph.saved_tensors_hooks` entered around a forward sees every tensor an
operation saves for backward, except where an inner hook takes over: activation checkpointing
keeps only its region's inputs (which it saves through the outer hooks), and activation offload
(plait/parallel/activation_offload.py) moves its blocks' tensors to host memory, so what the
meter counts is what stays on the device. Each storage counts once (one tensor is saved by
several operations; views share a storage); parameters (FSDP's gathered ones included) are
not activations and do not count. The meter holds no tensor: a weak reference to each storage
takes it off the count when autograd frees it, so ``peak`` is the most ever held at once, with
pipeline schedules' several micro-batches in flight as with one.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    wait = getattr(t, "trigger_wait", None)  # functional collectives' wrappers hold no storage
    t = wait() if wait is not None else t
    if isinstance(t, DTensor):
        return _local(t.to_local())
    return t


def _is_parameter(t: torch.Tensor) -> bool:
    """A parameter or a view of one (``weight.t()`` inside a linear layer). FSDP's gathered
    parameters are Parameters too: FSDP registers them while the block runs. Checked by type
    at every save, which costs next to nothing in the step it measures."""
    return isinstance(t, nn.Parameter) or isinstance(getattr(t, "_base", None), nn.Parameter)


class SavedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Counts the device storages saved for backward while entered (see the module doc)."""

    def __init__(self):
        self.live = self.peak = 0
        self._held: dict[int, weakref.ref] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if _is_parameter(t):
                return t
            local = _local(t)
            if local.device.type != "meta":
                storage = local.untyped_storage()
                key = storage.data_ptr()
                if key not in self._held:
                    self._hold(key, storage)
            return t

        super().__init__(pack, lambda t: t)

    def _hold(self, key: int, storage: torch.UntypedStorage) -> None:
        nbytes = storage.nbytes()

        def freed(_ref: weakref.ref) -> None:
            if self._held.pop(key, None) is not None:
                self.live -= nbytes

        self._held[key] = weakref.ref(storage, freed)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

