"""ParallelDims: the layout's degrees, validated, turned into one DeviceMesh with named dims.

The mesh is ``pp × dp_replicate × dp_shard × cp_ring × cp_ulysses × tp`` (outermost first):
tensor parallel, the chattiest dimension, gets neighbouring ranks (the same node on a GPU
cluster); pipeline parallel, which only sends activations between stages, gets the farthest.
Context parallelism (cp = cp_ring × cp_ulysses) sits next to tp because it too moves
activations every layer; Ulysses' all-to-all is the heavier of its two, so it is inner. Every
parallel component asks this object (``dims.tp_enabled``, ``dims.group("tp")``,
``dims.submesh("shard")``, ``dims.local_rank("pp")``) instead of keeping process groups of its
own or indexing the mesh by name.

Context-parallel ranks hold the same weights and see different tokens of the same sequences,
so for gradients they are data-parallel ranks: gradients are reduced over ``dp × cp``
(``grad_mesh``) and FSDP shards over ``dp_shard × cp`` (``fsdp_mesh``), as in torchtitan.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from plait import layout
from plait.config import JobConfig, degrees

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp_ring", "cp_ulysses", "tp")


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    world_size: int
    tp: int = 1
    pp: int = 1
    cp_ring: int = 1
    cp_ulysses: int = 1
    ep: int = 1
    workers: bool = False  # lowbw: dp_replicate groups are DiLoCo workers, not synced every step
    mesh: DeviceMesh | None = field(default=None, repr=False)
    dp_mesh: DeviceMesh | None = field(default=None, repr=False)  # dp_replicate x dp_shard, flattened
    grad_mesh: DeviceMesh | None = field(default=None, repr=False)  # dp x cp, flattened: gradient sums
    fsdp_mesh: DeviceMesh | None = field(default=None, repr=False)  # dp_shard x cp (with dp_replicate: HSDP)
    cp_mesh: DeviceMesh | None = field(default=None, repr=False)  # cp_ring x cp_ulysses, flattened
    ep_mesh: DeviceMesh | None = field(default=None, repr=False)  # experts split over it
    expert_fsdp_mesh: DeviceMesh | None = field(default=None, repr=False)  # (dp_replicate x) edp
    named_groups: list = field(default_factory=list, repr=False)  # (group, name) of flattened meshes but dp

    @classmethod
    def from_config(cls, cfg: JobConfig, world_size: int) -> "ParallelDims":
        """Resolve ``dp_shard = -1`` against the world; raises ConfigError if it does not fit."""
        d = degrees(cfg, world_size)
        dp = layout.resolve_dp(d)
        ring, ulysses = layout.cp_degrees(d)
        return cls(dp_replicate=d.dp_replicate, dp_shard=layout.shard_degree(d, dp), world_size=world_size, tp=d.tp,
                   pp=d.pp, cp_ring=ring, cp_ulysses=ulysses, ep=d.ep, workers=d.workers)

    @property
    def cp(self) -> int:
        return self.cp_ring * self.cp_ulysses

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def shard_degree(self) -> int:
        """Ranks FSDP shards over: dp_shard x cp."""
        return self.dp_shard * self.cp

    @property
    def grad_degree(self) -> int:
        """Ranks whose gradients are summed every step: dp x cp (one worker's with lowbw)."""
        return (self.dp_shard if self.workers else self.dp) * self.cp

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many ranks see different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.shard_degree > 1

    @property
    def ddp_enabled(self) -> bool:
        return self.dp_replicate > 1 and self.shard_degree == 1 and not self.workers

    @property
    def hsdp_enabled(self) -> bool:
        return self.dp_replicate > 1 and self.shard_degree > 1 and not self.workers

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
        parts = [f"workers({self.dp_replicate})"] if self.workers else []
        if self.hsdp_enabled:
            parts.append(f"hsdp({self.dp_replicate}x{self.shard_degree})")
        elif self.fsdp_enabled:
            parts.append(f"fsdp({self.shard_degree})")
        elif self.ddp_enabled:
            parts.append(f"ddp({self.dp_replicate})")
        if self.tp_enabled:
            parts.append(f"tp({self.tp})")
        if self.cp_enabled:
            kind = "ring" if self.cp_ulysses == 1 else "ulysses" if self.cp_ring == 1 else f"{self.cp_ring}x{self.cp_ulysses}"
            parts.append(f"cp({self.cp},{kind})")
        if self.ep > 1:
            parts.append(f"ep({self.ep})")
        if self.pp_enabled:
            parts.append(f"pp({self.pp})")
        return "x".join(parts)

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """Create the mesh and the flattened ``dp_mesh``; None for a single process without a
        process group."""
        if self.world_size == 1 and not dist.is_initialized():
            return None
        if self.ep > 1:
            return self._build_expert_mesh(device_type)
        shape = (self.pp, self.dp_replicate, self.dp_shard, self.cp_ring, self.cp_ulysses, self.tp)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
        # Keep the flattened meshes: slicing them back out of the root mesh is deprecated.
        self.dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        self.mesh = mesh
        if not self.cp_enabled:
            self.grad_mesh = mesh["dp_shard"] if self.workers else self.dp_mesh
            # Replicated over dp_replicate whenever that is a real dim: HSDP, or FSDP with a shard
            # of one under DDP (memory.offload = params).
            replicated = self.dp_replicate > 1 and not self.workers
            self.fsdp_mesh = mesh["dp_replicate", "dp_shard"] if replicated else mesh["dp_shard"]
            return mesh
        self.cp_mesh = mesh["cp_ring", "cp_ulysses"]._flatten("cp")
        shard = mesh["dp_shard", "cp_ring", "cp_ulysses"]._flatten("dp_shard_cp")
        self.grad_mesh = shard if self.workers else mesh["dp_replicate", "dp_shard", "cp_ring", "cp_ulysses"]._flatten("dp_cp")
        if self.hsdp_enabled:
            with warnings.catch_warnings():
                # torch has no other way yet to pair a flattened dim with a plain one.
                warnings.filterwarnings("ignore", message="Slicing a flattened dim")
                shard = mesh["dp_replicate", "dp_shard_cp"]
        self.fsdp_mesh = shard
        self.named_groups = [(self.cp_mesh.get_group(), "cp"), (self.grad_mesh.get_group(), "dp_cp"),
                              (self.shard_group(), "dp_shard_cp")]
        return mesh

    def _build_expert_mesh(self, device_type: str) -> DeviceMesh:
        """With expert parallelism dp_shard is split into edp x ep (ep inner): experts are
        sharded over ep and FSDP-sharded over edp; everything else is FSDP-sharded over both,
        flattened back into ``dp_shard``. (Validation keeps cp at 1 here.)"""
        names = ("pp", "dp_replicate", "edp", "ep", "cp_ring", "cp_ulysses", "tp")
        shape = (self.pp, self.dp_replicate, self.dp_shard // self.ep, self.ep, 1, 1, self.tp)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
        self.mesh = mesh
        self.dp_mesh = self.grad_mesh = mesh["dp_replicate", "edp", "ep"]._flatten("dp")
        shard = mesh["edp", "ep"]._flatten("dp_shard")
        if self.hsdp_enabled:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Slicing a flattened dim")
                shard = mesh["dp_replicate", "dp_shard"]
        self.fsdp_mesh = shard
        self.ep_mesh = mesh["ep"]
        self.expert_fsdp_mesh = mesh["dp_replicate", "edp"] if self.dp_replicate > 1 else mesh["edp"]
        self.named_groups = [(self.shard_group(), "dp_shard")]
        return mesh

    def worker_groups(self) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
        """(sync group, worker group) for lowbw: the ranks holding the same pieces in every
        worker (a new group, so background exchanges never interleave with the step's
        collectives), and the ranks of this rank's worker (its checkpoints, its norms).
        Collective: every rank calls it."""
        if self.mesh is None:
            return None, None
        ranks = self.mesh.mesh  # rank ids, shape = the mesh's
        replicate = MESH_DIMS.index("dp_replicate")
        across = ranks.movedim(replicate, -1).reshape(-1, self.dp_replicate).tolist()
        within = ranks.movedim(replicate, 0).reshape(self.dp_replicate, -1).tolist()
        sync, _ = dist.new_subgroups_by_enumeration(across)
        worker, _ = dist.new_subgroups_by_enumeration(within)
        return sync, worker

    def _degree(self, name: str) -> int:
        degrees = {
            "pp": self.pp, "tp": self.tp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard,
            "cp_ring": self.cp_ring, "cp_ulysses": self.cp_ulysses, "cp": self.cp, "dp": self.dp,
            "grad": self.grad_degree, "shard": self.shard_degree, "ep": self.ep,
            "expert_shard": self.dp_replicate * self.dp_shard // self.ep,
        }
        if name not in degrees:
            raise KeyError(f"no parallel dimension named {name!r}; known: {', '.join(degrees)}")
        return degrees[name]

    def submesh(self, name: str) -> DeviceMesh | None:
        """The DeviceMesh of a named dimension, for torch APIs that take a mesh (DTensor,
        fully_shard, replicate); None when the dimension is off (degree 1) or there is no mesh.

        Names: the mesh dims (``pp``, ``dp_replicate``, ``dp_shard``, ``cp_ring``,
        ``cp_ulysses``, ``tp``), ``cp`` (ring x ulysses), ``dp`` (every data-parallel rank),
        ``grad`` (the ranks gradients are summed over: dp x cp, one worker's with lowbw),
        ``shard`` (what FSDP / ZeRO-1 shard over; 2-D under HSDP), ``ep`` (experts split over
        it) and ``expert_shard`` (what experts are FSDP-sharded over: present whenever ep > 1)."""
        # Experts are an FSDP unit of their own whenever they are split, even over one rank.
        off = self._degree(name) == 1 and not (name == "expert_shard" and self.ep > 1)
        if self.mesh is None or off:
            return None
        flattened = {"dp": self.dp_mesh, "grad": self.grad_mesh, "shard": self.fsdp_mesh, "cp": self.cp_mesh,
                     "ep": self.ep_mesh, "expert_shard": self.expert_fsdp_mesh}
        return flattened[name] if name in flattened else self.mesh[name]

    def group(self, name: str) -> dist.ProcessGroup | None:
        """The process group of a named dimension (see ``submesh``), None when it is off or
        there is no mesh. For ``shard`` and ``expert_shard`` it is the group sharded over,
        without dp_replicate."""
        mesh = self.submesh(name)
        return None if mesh is None else mesh.get_group(mesh.ndim - 1)

    def local_rank(self, name: str) -> int:
        """This rank's index along a named dimension (0 when it is off or there is no mesh)."""
        mesh = self.submesh(name)
        return 0 if mesh is None else mesh.get_local_rank(mesh.ndim - 1)

    def labelled_groups(self) -> list[tuple[dist.ProcessGroup, str]]:
        """Every process group of the mesh with the name its collectives are counted under, in
        the order to register them (a later name for the same group wins): ``dp``, each mesh
        dim, then the other flattened meshes. Empty without a mesh."""
        if self.mesh is None:
            return []
        dims = [(self.mesh.get_group(index), name) for index, name in enumerate(self.mesh.mesh_dim_names)]
        return [(self.dp_mesh.get_group(), "dp"), *dims, *self.named_groups]

    def shard_group(self) -> dist.ProcessGroup:
        """The group FSDP / ZeRO-1 shard over (dp_shard x cp), without dp_replicate."""
        return self.fsdp_mesh.get_group(self.fsdp_mesh.ndim - 1)

    def cp_rank(self) -> int:
        """This rank's index among the context-parallel ranks (0 without cp)."""
        return self.local_rank("cp")

    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (0 without a mesh)."""
        return self.local_rank("dp")

    def pp_rank(self) -> int:
        return self.local_rank("pp")


@contextlib.contextmanager
def local_process_group(needed: bool, cuda: bool) -> Iterator[None]:
    """A one-rank process group for a single process that needs one (FSDP2's CPU offload runs
    on a mesh), torn down afterwards; nothing when ``needed`` is false or a group exists."""
    if not needed or dist.is_initialized():
        yield
        return
    # On CUDA, offloaded tensors on the host need gloo next to NCCL (gradient-norm reductions).
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
