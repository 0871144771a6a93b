"""``memory.offload = optimizer`` (ZeRO-Offload): AdamW whose moments and update live in host
memory while the parameters and their gradients stay on the device.

The optimizer's ``param_groups`` hold the model's own parameters, so everything keyed by them
keeps working unchanged: DCP's state dicts (keyed by parameter name through them), the lr
schedule, gradient clipping before the step, and ZeRO-1's ``ZeroRedundancyOptimizer`` built
with this class. For the step, each parameter and its gradient are copied to the host, the
stock AdamW runs there on the host moments, and the result is copied back. No persistent host
master copy is kept: plait writes parameters itself (weight loading, the DiLoCo outer step), and
a stale master would silently undo that. Checkpoints have plain AdamW's layout, so a run can
resume with any ``memory.offload``.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from plait.telemetry.device_memory import host_memory

HOST = torch.device("cpu")


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t`` (pinned, and the copy asynchronous, from a CUDA device)."""
    if t.device.type == "cpu":
        return t.detach().clone()
    return t.detach().to(HOST, non_blocking=True, copy=True)


class HostOffloadAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with its state and arithmetic on the host (see the module doc)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with host_memory():  # a device-memory tracker (CPU runs) counts none of this
            self._host_step()
        return loss

    def _host_step(self) -> None:
        own_params = [group["params"] for group in self.param_groups]
        own_state = self.state
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (device parameter, host copy)
        host_state: defaultdict = defaultdict(dict)
        try:
            for group in self.param_groups:
                host_params = []
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    host = _to_host(p)
                    host.grad = _to_host(p.grad)
                    # The same dict: state AdamW creates for ``host`` lands in self.state[p].
                    host_state[host] = own_state[p]
                    host_params.append(host)
                    pairs.append((p, host))
                group["params"] = host_params
            if any(p.device.type == "cuda" for p, _ in pairs):
                torch.cuda.current_stream().synchronize()  # the asynchronous copies have landed
            self.state = host_state
            super().step()
        finally:
            self.state = own_state
            for group, params in zip(self.param_groups, own_params):
                group["params"] = params
        for p, host in pairs:
            p.copy_(host, non_blocking=True)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)  # torch casts the moments to each parameter's device
        for state in self.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and value.device != HOST:
                    state[key] = value.to(HOST)
