"""Activation offload (``memory.activation_offload``): what chosen blocks save for backward goes
to host memory during forward and comes back before their backward.

Each chosen block gets a forward pre-hook that enters :class:`torch.autograd.graph.saved_tensors_hooks`
and a post-hook that leaves it. Module hooks run around the block's ``forward``, so around
activation checkpointing's wrapper (plait/parallel/recompute.py): a checkpointed block then
offloads only its inputs, the tensors checkpointing keeps; the hooks inside the checkpointed
region would override checkpointing's own and silently keep everything.

What a block forward saves is copied once per storage (one tensor is saved by several ops, and
views of one storage are saved separately) into a :class:`_Stash`; views are rebuilt on the way
back. Not copied: the block's parameters (FSDP's gathered ones included: they are the
parameters registered while the block runs), tensors smaller than ``min_bytes``, and tensors
already in host memory.

On CUDA the host buffers are pinned and copies run on a side stream: in forward each copy
starts once the tensor is computed, and in backward the first use of a block's stash brings it
in (if it is not already there) and starts bringing in the stash of the block before it, so
the copy overlaps this block's backward. On CPU, host and device are the same memory; the
copies are real copies all the same, so the path that runs on a GPU runs here, and the
:class:`OffloadLedger` counts what would have left the device.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from plait.parallel.recompute import model_blocks
from plait.telemetry.device_memory import host_memory

# Below this a tensor stays on the device: the copy costs more than the memory it frees.
MIN_BYTES = 1024


@dataclass
class OffloadLedger:
    """Bytes moved to host memory: in total, in host memory now, and at most at once."""

    offloaded: int = 0
    host_now: int = 0
    host_peak: int = 0

    def add(self, nbytes: int) -> None:
        self.offloaded += nbytes
        self.host_now += nbytes
        self.host_peak = max(self.host_peak, self.host_now)

    def release(self, nbytes: int) -> None:
        self.host_now -= nbytes


def _ready(t: torch.Tensor) -> torch.Tensor:
    """Functional collectives (TP's sequence parallel) hand out wrappers without a storage."""
    wait = getattr(t, "trigger_wait", None)
    return wait() if wait is not None else t


def _local(t: torch.Tensor) -> torch.Tensor:
    return _ready(t.to_local()) if isinstance(t, DTensor) else t


def _bytes_of(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage, 0, (storage.nbytes(),), (1,))


class _Stash:
    """The host copies of one block forward's saved tensors, keyed by device storage."""

    def __init__(self, owner: "ActivationOffload", index: int, previous: "_Stash | None"):
        self.owner, self.index = owner, index
        self.previous = weakref.ref(previous) if previous is not None else None
        self.host: dict[int, torch.Tensor] = {}  # storage pointer -> host bytes
        self.originals: list[torch.Tensor] = []  # alive until the forward ends: pointers stay unique
        self.device: dict[int, torch.Tensor] | None = None  # back on the device (or coming)
        self.arrived: Any = None  # CUDA event of a prefetch
        self.nbytes = 0

    def put(self, local: torch.Tensor) -> int:
        storage = local.untyped_storage()
        key = storage.data_ptr()
        if key not in self.host:
            source = _bytes_of(storage, local.device)
            self.host[key] = self.owner.copy_out(source)
            self.originals.append(source)
            self.nbytes += storage.nbytes()
            self.owner.ledger.add(storage.nbytes())
        return key

    def end_forward(self) -> None:
        """The block's forward is over: drop the originals; the host bytes are released when
        autograd drops the last packed tensor (the stash goes with it)."""
        self.originals.clear()
        weakref.finalize(self, self.owner.ledger.release, self.nbytes)

    def fetch(self, key: int) -> torch.Tensor:
        if self.device is None:
            self.device = {k: self.owner.copy_in(h, prefetch=False) for k, h in self.host.items()}
        elif self.arrived is not None:
            torch.cuda.current_stream().wait_event(self.arrived)
            self.arrived = None
        previous = self.previous() if self.previous is not None else None
        if previous is not None and previous.device is None:
            previous.prefetch()
        return self.device[key]

    def prefetch(self) -> None:
        self.device = {k: self.owner.copy_in(h, prefetch=True) for k, h in self.host.items()}
        self.arrived = self.owner.record()


class ActivationOffload:
    """Saved-tensor hooks that move the chosen blocks' activations to host memory."""

    def __init__(self, device: torch.device, min_bytes: int = MIN_BYTES):
        self.device, self.min_bytes = device, min_bytes
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.ledger = OffloadLedger()
        self.enabled = True  # off: the blocks keep their activations (a benchmark's baseline)
        self._last: weakref.ref | None = None  # the latest block forward's stash

    # ---- copies

    def copy_out(self, source: torch.Tensor) -> torch.Tensor:
        with host_memory():  # what a device-memory tracker must not count (CPU runs)
            host = torch.empty(source.shape, dtype=source.dtype, pin_memory=self.cuda)
            if not self.cuda:
                return host.copy_(source)
        self.stream.wait_stream(torch.cuda.current_stream())  # the tensor has been computed
        with torch.cuda.stream(self.stream):
            host.copy_(source, non_blocking=True)
        source.record_stream(self.stream)  # its memory is not reused before the copy is done
        return host

    def copy_in(self, host: torch.Tensor, prefetch: bool) -> torch.Tensor:
        target = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        if not self.cuda:
            return target.copy_(host)
        if not prefetch:  # on the compute stream, once the side stream's copy out has landed
            torch.cuda.current_stream().wait_stream(self.stream)
            return target.copy_(host, non_blocking=True)
        # The target's memory may have been freed by work still queued on the compute stream.
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            target.copy_(host, non_blocking=True)
        return target

    def record(self) -> Any:
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    # ---- hooks

    def attach(self, block: nn.Module, index: int) -> None:
        """Offload what ``block`` (global layer ``index``) saves in every training forward."""
        state: dict[str, Any] = {}

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            cache = kwargs.get("cache", args[4] if len(args) > 4 else None)
            if not torch.is_grad_enabled() or cache is not None or not self.enabled:
                return  # evaluation, or generation with a KV cache: nothing is saved
            last = self._last() if self._last is not None else None
            stash = _Stash(self, index, last if last is not None and last.index < index else None)
            self._last = weakref.ref(stash)  # weak: autograd alone keeps a stash alive
            hooks = torch.autograd.graph.saved_tensors_hooks(*self._hooks(module, stash))
            hooks.__enter__()
            state["active"] = (hooks, stash)

        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            active = state.pop("active", None)
            if active is not None:
                hooks, stash = active
                hooks.__exit__(None, None, None)
                stash.end_forward()

        block.register_forward_pre_hook(pre, with_kwargs=True)
        block.register_forward_hook(post, with_kwargs=True, always_call=True)

    def _hooks(self, block: nn.Module, stash: _Stash):
        parameters: set[int] | None = None

        def pack(t: torch.Tensor) -> Any:
            nonlocal parameters
            t = _ready(t)
            local = _local(t)
            if parameters is None:  # FSDP has gathered the block's parameters by now
                parameters = {_local(p).untyped_storage().data_ptr() for p in block.parameters()}
            storage = local.untyped_storage()
            if (local.device.type != self.device.type or storage.nbytes() < self.min_bytes
                    or storage.data_ptr() in parameters):
                return t
            key = stash.put(local)
            view = (local.dtype, local.storage_offset(), tuple(local.shape), tuple(local.stride()))
            spec = (t.device_mesh, t.placements, t.shape, t.stride()) if isinstance(t, DTensor) else None
            return _Packed(stash, key, view, spec)

        def unpack(packed: Any) -> torch.Tensor:
            if not isinstance(packed, _Packed):
                return packed
            dtype, offset, shape, stride = packed.view
            data = packed.stash.fetch(packed.key)
            local = torch.empty(0, dtype=dtype, device=data.device).set_(data.untyped_storage(), offset, shape, stride)
            if packed.spec is None:
                return local
            mesh, placements, shape, stride = packed.spec
            return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)

        return pack, unpack


@dataclass(frozen=True)
class _Packed:
    stash: _Stash
    key: int
    view: tuple
    spec: tuple | None


def offloaded_indices(count: int, n_layers: int) -> list[int]:
    """Global layer indices whose activations ``memory.activation_offload = count`` offloads:
    the first ``count`` blocks (they keep their activations longest), every block for -1."""
    return list(range(n_layers if count < 0 else min(count, n_layers)))


def apply_activation_offload(model: nn.Module, count: int, n_layers: int, device: torch.device) -> ActivationOffload | None:
    """Offload the activations of ``model``'s blocks among the first ``count`` layers (global
    indices; a pipeline stage holds some of them); None when ``count`` is 0."""
    if count == 0:
        return None
    chosen = set(offloaded_indices(count, n_layers))
    offload = ActivationOffload(device)
    for index, block in model_blocks(model):
        if index in chosen:
            offload.attach(block, index)
    return offload
