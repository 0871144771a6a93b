"""Device-side memory of a step, measured where device and host are the same memory (CPU).

:class:`DeviceMemory` is a dispatch mode that sees every tensor an operation creates and keeps
a weak reference to its storage: ``live`` is what is held now, ``peak`` the most at once. What
would sit in host memory on a GPU is counted apart (``host_live``, ``host_peak``): tensors made inside :func:`host_memory` (the
activation offload's copies, the host optimizer step) and tensors registered with ``host=True``
or moved there with :meth:`DeviceMemory.mark_host`. Storage only: no allocator rounding or
caching, no runtime; on CUDA the allocator's own peak is the measure (plait/train/micro_batch.py).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_hosting = 0  # depth of host_memory() blocks


@contextlib.contextmanager
def host_memory() -> Iterator[None]:
    """Tensors created inside live in host memory (what a device tracker must not count)."""
    global _hosting
    _hosting += 1
    try:
        yield
    finally:
        _hosting -= 1


class DeviceMemory(TorchDispatchMode):
    """Live and peak bytes of device storage while entered (see the module doc)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.host_live = self.host_peak = 0  # the same for what lives in host memory
        self._held: dict[int, tuple[weakref.ref, int, bool]] = {}  # storage pointer -> (ref, bytes, on host)

    def add(self, *tensors: torch.Tensor | None, host: bool = False) -> None:
        """Count tensors that existed before (parameters, gradients, optimizer state)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._track(t, host)

    def mark_host(self, *tensors: torch.Tensor | None) -> None:
        """These tensors' storages now live in host memory (e.g. offloaded gradients)."""
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            for storage in get_untyped_storages(t):
                held = self._held.get(storage.data_ptr())
                if held is not None and not held[2]:
                    self._held[storage.data_ptr()] = (held[0], held[1], True)
                    self.live -= held[1]
                    self._host(held[1])

    def _track(self, t: torch.Tensor, host: bool) -> None:
        if t.device.type == "meta":
            return
        for storage in get_untyped_storages(t):
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if key == 0 or key in self._held:
                continue

            def freed(_ref: weakref.ref, key: int = key) -> None:
                held = self._held.pop(key, None)
                if held is not None and held[2]:
                    self.host_live -= held[1]
                elif held is not None:
                    self.live -= held[1]

            self._held[key] = (weakref.ref(storage, freed), nbytes, host)
            if host:
                self._host(nbytes)
            else:
                self.live += nbytes
                self.peak = max(self.peak, self.live)

    def _host(self, nbytes: int) -> None:
        self.host_live += nbytes
        self.host_peak = max(self.host_peak, self.host_live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, _hosting > 0)
        return out
