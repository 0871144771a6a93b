"""ParallelDims: the layout's degrees, validated, turned into one DeviceMesh with named dims.

The mesh is ``pp × dp_replicate × dp_shard × cp × tp`` (outermost first): tensor parallel,
the chattiest dimension, gets neighbouring ranks (the same node on a GPU cluster); pipeline
parallel, which only sends activations between stages, gets the farthest. ``cp`` is reserved
for context parallelism and has size 1 until it is enabled. Every parallel component asks
this object (``dims.tp_enabled``, ``dims.mesh["tp"]``, ``dims.dp_mesh``) instead of keeping
process groups of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from plait.config import JobConfig, resolve_dp

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    mesh: DeviceMesh | None = field(default=None, repr=False)
    dp_mesh: DeviceMesh | None = field(default=None, repr=False)  # dp_replicate x dp_shard, flattened

    @classmethod
    def from_config(cls, cfg: JobConfig, world_size: int) -> "ParallelDims":
        """Resolve ``dp_shard = -1`` against the world; raises ConfigError if it does not fit."""
        dp = resolve_dp(cfg, world_size)
        p = cfg.parallel
        shard = dp // p.dp_replicate if p.dp_shard == -1 else p.dp_shard
        return cls(dp_replicate=p.dp_replicate, dp_shard=shard, world_size=world_size, tp=p.tp, pp=p.pp)

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
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def layout_name(self) -> str:
        if self.world_size == 1:
            return "single"
        parts = []
        if self.hsdp_enabled:
            parts.append(f"hsdp({self.dp_replicate}x{self.dp_shard})")
        elif self.fsdp_enabled:
            parts.append(f"fsdp({self.dp_shard})")
        elif self.ddp_enabled:
            parts.append(f"ddp({self.dp_replicate})")
        if self.tp_enabled:
            parts.append(f"tp({self.tp})")
        if self.pp_enabled:
            parts.append(f"pp({self.pp})")
        return "x".join(parts)

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """Create the mesh and the flattened ``dp_mesh``; None for a single process without a
        process group."""
        if self.world_size == 1 and not dist.is_initialized():
            return None
        shape = (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
        # Keep the flattened mesh: slicing it back out of the root mesh is deprecated.
        self.dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        self.mesh = mesh
        return mesh

    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (0 without a mesh)."""
        return 0 if self.dp_mesh is None else self.dp_mesh.get_local_rank()

    def pp_rank(self) -> int:
        return 0 if self.mesh is None else self.mesh["pp"].get_local_rank()
