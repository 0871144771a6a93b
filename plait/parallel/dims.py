"""ParallelDims: the layout's degrees, validated, turned into one DeviceMesh with named dims.

Every parallel component asks this object (``dims.fsdp_enabled``, ``dims.dp_mesh``) instead
of keeping process groups of its own. Later layouts add their dimensions here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from plait.config import JobConfig, resolve_dp


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    world_size: int
    mesh: DeviceMesh | None = field(default=None, repr=False)
    dp_mesh: DeviceMesh | None = field(default=None, repr=False)  # dp_replicate x dp_shard, flattened

    @classmethod
    def from_config(cls, cfg: JobConfig, world_size: int) -> "ParallelDims":
        """Resolve ``dp_shard = -1`` against the world; raises ConfigError if it does not fit."""
        resolve_dp(cfg, world_size)
        p = cfg.parallel
        shard = world_size // p.dp_replicate if p.dp_shard == -1 else p.dp_shard
        return cls(dp_replicate=p.dp_replicate, dp_shard=shard, world_size=world_size)

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many ranks see different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def ddp_enabled(self) -> bool:
        return self.dp_replicate > 1 and self.dp_shard == 1

    @property
    def hsdp_enabled(self) -> bool:
        return self.dp_replicate > 1 and self.dp_shard > 1

    @property
    def layout_name(self) -> str:
        if self.world_size == 1:
            return "single"
        if self.hsdp_enabled:
            return f"hsdp({self.dp_replicate}x{self.dp_shard})"
        return f"fsdp({self.dp_shard})" if self.fsdp_enabled else f"ddp({self.dp_replicate})"

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """Create the mesh (dims ``dp_replicate``, ``dp_shard``; ``dp_mesh`` flattens them); None when
        running as a single process without a process group."""
        if self.world_size == 1 and not dist.is_initialized():
            return None
        mesh = init_device_mesh(
            device_type, (self.dp_replicate, self.dp_shard), mesh_dim_names=("dp_replicate", "dp_shard")
        )
        # Keep the flattened mesh: slicing it back out of the root mesh is deprecated.
        self.dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        self.mesh = mesh
        return mesh

    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (0 without a mesh)."""
        return 0 if self.dp_mesh is None else self.dp_mesh.get_local_rank()
