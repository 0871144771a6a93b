"""The CPU copy an asynchronous save writes from: allocated at the first save, reused after.

The optimizer updates the weights in place right after a save is handed to the background
writer, so the save writes a copy taken at its step. Allocating that copy afresh each save
(as torch's BlockingAsyncStager does) costs the training thread page faults over the whole
of the rank's shards, and its allocation deep-copies each DTensor before filling a second
buffer: two copies a save. Reusing one set of buffers makes it one ``copy_`` per tensor; the
price is that the copy (this rank's shards of the weights and optimizer state) stays in
memory for the whole run. The buffers may only be refilled once the save that read them was
written: :class:`.async_save.BackgroundSaver` stages a save only after the previous one ended.
"""

from __future__ import annotations

from typing import Any

# Private helpers of torch's own stagers (torch.distributed.checkpoint.staging): they copy
# plain tensors and DTensors alike, and return the state with its non-tensor values (the
# learning rate of each parameter group) taken from the state being staged.
from torch.distributed._state_dict_utils import CompanionMismatch, _copy_state_dict, _create_cpu_state_dict


class ReusedStaging:
    """CPU copies of one rank's checkpoint state, reused from save to save."""

    def __init__(self) -> None:
        self._buffers: dict[str, Any] | None = None

    def stage(self, state: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``state`` in this object's buffers (allocated at the first call, or again
        when the state's structure changed): valid until the next call."""
        if self._buffers is not None:
            try:
                return _copy_state_dict(state, self._buffers, type_check=False)
            except CompanionMismatch:  # new keys (an optimizer state that appeared): allocate anew
                pass
        self._buffers = _create_cpu_state_dict(state)
        return _copy_state_dict(state, self._buffers, type_check=False)
