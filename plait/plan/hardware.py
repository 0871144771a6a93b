"""The hardware the planner reasons about: GPUs, the links between them, and clusters of nodes.

Figures are vendor datasheet numbers (dense, no sparsity). What a kernel or a collective actually
reaches is a fraction of them; those fractions are physical constants kept next to the figures
(``gemm_efficiency``, ``hbm_efficiency``, ``Link.efficiency``) so that a new GPU or link is one
row, not a refit.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from plait.errors import ConfigError

GIB = 2**30
TERA = 1e12
GIGA = 1e9


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator. FLOP/s are dense peaks per device; memory in bytes; bandwidth in bytes/s."""

    name: str
    bf16_flops: float
    fp8_flops: float | None  # None: no fp8 tensor cores
    fp32_flops: float  # TF32 tensor cores on GPUs (what fp32 matmuls use), plain fp32 on CPUs
    memory_bytes: float
    hbm_bytes_per_s: float
    # The fraction of peak a large, well-shaped GEMM reaches (cuBLAS/rocBLAS on transformer
    # shapes). 0.74 on A100 is the value Megatron-LM's Table 1 gives (bench/planner_published.py).
    gemm_efficiency: float = 0.74
    # Smaller GEMMs fill fewer tiles and keep fewer loads in flight: efficiency = max x d / (d +
    # gemm_half_dim) on the smallest dimension d (a head_dim of 128 runs at ~3/4 of the maximum).
    gemm_half_dim: float = 40.0
    # The fraction of HBM bandwidth element-wise kernels (norms, activations, softmax) reach.
    hbm_efficiency: float = 0.9
    # Memory the runtime holds before any tensor: CUDA/ROCm context, cuBLAS/NCCL workspaces.
    reserved_bytes: float = 1.0 * GIB
    # The share of a core each rank gets when every rank computes (CPU ranks that outnumber the
    # cores); the FLOP/s above are that contended rate. 1.0: every device is its own.
    core_share: float = 1.0
    # Flash attention's FLOP rate as a fraction of a GEMM's at the same shape (its softmax and
    # online rescaling run between the matmuls). 1.0 on A100s, whose flash kernels keep the
    # tensor cores as busy as a GEMM; 0.6 on Hopper and Blackwell (see the catalog); the CPU's is
    # measured (``--calibrate``).
    attention_efficiency: float = 1.0
    # Host time to issue one operator (Python, dispatcher, autograd bookkeeping, kernel launch).
    # On a GPU the host runs ahead of the device, so a block costs max(host, device); on a CPU
    # the same thread does both, so they add (``host_async``).
    op_overhead_s: float = 5e-6
    # Extra host time per operator on a DTensor (tensor parallelism): sharding propagation and
    # redistribution in Python.
    dtensor_op_s: float = 30e-6
    host_async: bool = True
    # How much slower a training step runs on ranks that share cores than their share of the
    # cores predicts (measured by ``--calibrate`` on a small Llama, 1.00-1.25 on the dev
    # machine; its cause is not modelled). Applies only when core_share < 1.
    sharing_slowdown: float = 1.0
    # The caching allocator's fragmentation: freed blocks of the wrong size kept around, about a
    # tenth of the tensors that come and go each step (activations, gathered weights, logits).
    fragmentation: float = 0.10
    # Host side, per GPU. ``host_link_bytes_per_s``: one direction of the GPU's host link (PCIe Gen4
    # x16 ~25 GB/s, Gen5 ~50 GB/s achieved); on a CPU a "host copy" is a memcpy. ``host_memory_bytes``:
    # the node's DRAM over its GPUs. ``host_memory_bytes_per_s``: the GPU's share of the host's DRAM
    # bandwidth, which an optimizer step on the host (offload) runs at. ``unified_memory``: device
    # and host memory are one pool (a CPU), so what fits is their sum.
    host_link_bytes_per_s: float = 50 * GIGA
    host_memory_bytes: float = 250 * GIGA
    host_memory_bytes_per_s: float = 100 * GIGA
    unified_memory: bool = False
    # Compute slows while a collective runs beside it: NCCL's kernels occupy SMs and share HBM
    # bandwidth with the GEMMs (overlap studies measure 10-20% slower GEMMs during a concurrent
    # all-gather or reduce-scatter). Charged as this fraction of the communication time hidden
    # behind compute. 0 on CPUs, where nothing overlaps (``core_share``).
    comm_overlap_slowdown: float = 0.15

    def peak_flops(self, dtype: str) -> float:
        """Peak matmul FLOP/s for ``dtype`` ('bf16', 'fp8' or 'fp32')."""
        if dtype == "fp8":
            if self.fp8_flops is None:
                raise ConfigError(f"train.dtype = 'fp8': cluster.gpu = '{self.name}' has no fp8 tensor cores")
            return self.fp8_flops
        return self.bf16_flops if dtype == "bf16" else self.fp32_flops


GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        # DGX A100: PCIe Gen4 to the host, 1 TB (40 GB parts) or 2 TB (80 GB parts) of DRAM for 8 GPUs.
        GpuSpec("a100-40gb", 312 * TERA, None, 156 * TERA, 40 * GIGA, 1.555e12, host_link_bytes_per_s=25 * GIGA,
                host_memory_bytes=125 * GIGA),
        GpuSpec("a100-80gb", 312 * TERA, None, 156 * TERA, 80 * GIGA, 2.039e12, host_link_bytes_per_s=25 * GIGA),
        # Hopper and Blackwell GEMMs sustain about 62% of the datasheet under a training load (the
        # clocks drop below the boost the datasheet assumes), and twice the work per SM needs twice
        # the tile depth to hide latency, so their half-efficiency dimension doubles. The flash
        # attention kernels frameworks run there (FlashAttention-2 class: PyTorch's SDPA) reach
        # about 35-40% of the peak against the GEMMs' ~62% (FlashAttention-3 paper, Shah et al.
        # 2024), so attention runs at 0.6 of a GEMM's rate; on A100 they match the GEMMs.
        # Their nodes reach the host over PCIe Gen5 and hold 2 TB (DGX B200: 4 TB) for 8 GPUs.
        GpuSpec("h100-sxm", 989 * TERA, 1979 * TERA, 494 * TERA, 80 * GIGA, 3.35e12, gemm_efficiency=0.62,
                gemm_half_dim=80.0, attention_efficiency=0.6),
        GpuSpec("h100-pcie", 756 * TERA, 1513 * TERA, 378 * TERA, 80 * GIGA, 2.0e12, gemm_efficiency=0.62,
                gemm_half_dim=80.0, attention_efficiency=0.6),
        GpuSpec("h200", 989 * TERA, 1979 * TERA, 494 * TERA, 141 * GIGA, 4.8e12, gemm_efficiency=0.62,
                gemm_half_dim=80.0, attention_efficiency=0.6),
        # One of the two dies of an MI250X, which the software sees as one GPU.
        # Frontier-class node: 512 GB of DRAM for 8 GCDs, Infinity Fabric to the host (~36 GB/s each).
        GpuSpec("mi250x-gcd", 191.5 * TERA, None, 47.9 * TERA, 64 * GIGA, 1.6e12, gemm_efficiency=0.70,
                host_link_bytes_per_s=36 * GIGA, host_memory_bytes=64 * GIGA),
        GpuSpec("b200", 2250 * TERA, 4500 * TERA, 1100 * TERA, 192 * GIGA, 8.0e12, gemm_efficiency=0.62,
                gemm_half_dim=160.0, host_memory_bytes=500 * GIGA,
                attention_efficiency=0.6),
        # This machine's CPU cores, nominal; ``plait plan --cluster.gpu cpu --calibrate`` measures them.
        # Host memory is the same RAM as the "device" memory (``unified_memory``).
        GpuSpec("cpu", 0.05 * TERA, None, 0.05 * TERA, 8 * GIGA, 10e9, gemm_efficiency=1.0, gemm_half_dim=16.0,
                hbm_efficiency=1.0, reserved_bytes=0.3 * GIB, attention_efficiency=0.3, op_overhead_s=20e-6,
                dtensor_op_s=120e-6, host_async=False, host_link_bytes_per_s=5 * GIGA, host_memory_bytes=8 * GIGA,
                host_memory_bytes_per_s=10e9, unified_memory=True, comm_overlap_slowdown=0.0),
    )
}


@dataclass(frozen=True)
class Link:
    """A connection type. ``bytes_per_s`` is per GPU and per direction; ``latency_s`` per message."""

    name: str
    bytes_per_s: float
    latency_s: float
    # Bus bandwidth NCCL-style collectives reach on this link, as a fraction of the datasheet.
    efficiency: float = 0.8
    # Gloo: a reduce-scatter runs as an all-reduce of the whole buffer (gloo has none), and an
    # all-gather between ranks that share cores takes as long as an all-reduce of the gathered
    # size (measured: bench notes in BENCHMARKS.md). NCCL-style links: False.
    partial_as_all_reduce: bool = False
    # A send/recv pair between ranks that share cores waits for the receiver to be scheduled,
    # and a large message for several of its wake-ups: measured under load by ``--calibrate``.
    # None: ``latency_s`` and the achieved bandwidth.
    p2p_latency_s: float | None = None
    p2p_bytes_per_s: float | None = None
    # Network links: the share of the NIC rate left when traffic climbs above the leaf switch
    # (static ECMP hashing puts several large flows on one spine link; studies of AI fabrics
    # report 20-40% less without adaptive routing), per tier; and one switch traversal's latency.
    spine_efficiency: float = 1.0
    switch_latency_s: float = 0.0
    # One step of a ring or tree collective across this link, when longer than a message's
    # latency: NCCL's bulk (Simple) protocol synchronizes each step through its network proxy
    # thread (its tuning model: 14 us per network step). None: ``latency_s``.
    collective_step_s: float | None = None

    @property
    def step_latency_s(self) -> float:
        return self.latency_s if self.collective_step_s is None else max(self.latency_s, self.collective_step_s)

    @property
    def achieved_bytes_per_s(self) -> float:
        return self.bytes_per_s * self.efficiency


LINKS: dict[str, Link] = {
    lk.name: lk
    for lk in (
        Link("nvlink3", 300 * GIGA, 3e-6),
        Link("nvlink4", 450 * GIGA, 3e-6),
        Link("nvlink5", 900 * GIGA, 3e-6),
        Link("pcie4", 32 * GIGA, 5e-6),
        Link("pcie5", 64 * GIGA, 5e-6),
        # Network links: per GPU, i.e. one NIC per GPU (rail-optimized nodes).
        # InfiniBand's adaptive routing spreads flows over the spine better than RoCE's ECMP.
        Link("ib-hdr", 25 * GIGA, 5e-6, efficiency=0.9, spine_efficiency=0.85, switch_latency_s=0.2e-6,
             collective_step_s=14e-6),
        Link("ib-ndr", 50 * GIGA, 5e-6, efficiency=0.9, spine_efficiency=0.85, switch_latency_s=0.2e-6,
             collective_step_s=14e-6),
        Link("roce", 50 * GIGA, 10e-6, efficiency=0.8, spine_efficiency=0.75, switch_latency_s=0.6e-6,
             collective_step_s=14e-6),
        Link("ethernet", 12.5 * GIGA, 30e-6, efficiency=0.6, spine_efficiency=0.75, switch_latency_s=1e-6),
        # Local gloo ranks over loopback TCP; ``--calibrate`` replaces it with measured figures.
        Link("loopback", 2 * GIGA, 50e-6, efficiency=1.0, partial_as_all_reduce=True),
    )
}

# What a node of each GPU is usually built with, used when the cluster does not name its links.
DEFAULT_LINKS: dict[str, tuple[str, str]] = {
    "a100-40gb": ("nvlink3", "ib-hdr"),
    "a100-80gb": ("nvlink3", "ib-hdr"),
    "h100-sxm": ("nvlink4", "ib-ndr"),
    "h100-pcie": ("pcie5", "ib-ndr"),
    "h200": ("nvlink4", "ib-ndr"),
    "mi250x-gcd": ("nvlink3", "roce"),  # Infinity Fabric between GCDs is in the NVLink3 class
    "b200": ("nvlink5", "ib-ndr"),
    "cpu": ("loopback", "ethernet"),
}


@dataclass(frozen=True)
class NodeGroup:
    """``nodes`` nodes whose GPUs reach other nodes over ``inter_link`` (heterogeneous clusters)."""

    nodes: int
    inter_link: Link


@dataclass(frozen=True)
class Cluster:
    """``gpus`` devices, ``gpus_per_node`` per node; ranks are numbered node by node."""

    gpu: GpuSpec
    gpus: int
    gpus_per_node: int
    intra_link: Link
    inter_link: Link
    groups: tuple[NodeGroup, ...] = field(default_factory=tuple)
    # Nodes under one leaf switch of the network (per rail): a group spanning more climbs to the
    # spine (plait.plan.comm.fabric_tiers).
    nodes_per_leaf: int = 32

    @property
    def nodes(self) -> int:
        return max(1, self.gpus // self.gpus_per_node)

    @property
    def heterogeneous(self) -> bool:
        return len({g.inter_link.name for g in self.groups}) > 1

    def link_for_span(self, span: int) -> Link:
        """The link a group of consecutive-stride ranks spanning ``span`` rank ids crosses."""
        return self.intra_link if span <= self.gpus_per_node else self.inter_link

    def with_inter_link(self, link: Link) -> "Cluster":
        return dataclasses.replace(self, inter_link=link, groups=())


def lookup_gpu(name: str) -> GpuSpec:
    if name not in GPUS:
        raise ConfigError(f"cluster.gpu = {name!r} is not in the catalog; choose one of {', '.join(GPUS)}")
    return GPUS[name]


def lookup_link(key: str, name: str) -> Link:
    if name not in LINKS:
        raise ConfigError(f"{key} = {name!r} is not a known link; choose one of {', '.join(LINKS)}")
    return LINKS[name]


def parse_node_groups(text: str) -> tuple[NodeGroup, ...]:
    """``"4xib-ndr,4xroce"`` -> node groups in rank order (the first group holds the lowest ranks)."""
    groups = []
    for part in text.split(","):
        count, sep, link = part.strip().partition("x")
        if not sep or not count.isdigit() or int(count) < 1:
            raise ConfigError(
                f"cluster.node_groups = {text!r}: each entry is NODESxLINK, e.g. '4xib-ndr,4xroce'"
            )
        groups.append(NodeGroup(int(count), lookup_link("cluster.node_groups", link)))
    return tuple(groups)


def default_profile_path() -> str:
    """Where ``--calibrate`` writes this machine's measured profile (JSON)."""
    return os.path.join(".plait_cache", "plan_profile_cpu.json")


def load_profile(path: str) -> tuple[GpuSpec, Link]:
    """The measured CPU device and loopback link from a profile written by ``--calibrate``."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cluster.profile = {path!r} cannot be read as a calibration profile: {exc}") from None
    return parse_profile(data, path)


def parse_profile(data: dict, path: str = "<profile>") -> tuple[GpuSpec, Link]:
    """The measured CPU device and loopback link from a profile's fields (``path`` names it in errors)."""
    base = GPUS["cpu"]
    try:
        gpu = dataclasses.replace(
            base, fp32_flops=float(data["matmul_flops"]), bf16_flops=float(data["matmul_flops"]),
            gemm_half_dim=float(data["gemm_half_dim"]), hbm_bytes_per_s=float(data["memory_bytes_per_s"]),
            memory_bytes=float(data["memory_bytes"]), host_memory_bytes=float(data["memory_bytes"]),
            host_memory_bytes_per_s=float(data["memory_bytes_per_s"]),
            core_share=min(1.0, float(data.get("cores", data["ranks"])) / float(data["ranks"])),
            # Profiles from before these were measured keep the catalog's nominal values.
            attention_efficiency=float(data.get("attention_efficiency", base.attention_efficiency)),
            op_overhead_s=float(data.get("op_overhead_s", base.op_overhead_s)),
            dtensor_op_s=float(data.get("dtensor_op_s", base.dtensor_op_s)),
            sharing_slowdown=float(data.get("sharing_slowdown", base.sharing_slowdown)),
        )
        p2p = {key: float(data[key]) for key in ("p2p_latency_s", "p2p_bytes_per_s") if key in data}
        link = Link("loopback", float(data["link_bytes_per_s"]), float(data["link_latency_s"]), efficiency=1.0,
                    partial_as_all_reduce=True, **p2p)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"cluster.profile = {path!r} lacks the field {exc}; rerun --calibrate") from None
    return gpu, link
