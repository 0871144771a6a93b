"""What the planner is asked about: the model, the cluster and the training job, as typed sections.

The field names are the trainer's (``model.dim``, ``train.seq_len``) so one TOML file serves both
``plait train`` and ``plait plan``; the planner adds what only it needs (``model.mlp``, the
``cluster`` section, how kernels and overlap behave in ``train``). A trainer TOML's other
sections and fields are ignored; on the command line every key must be one of these.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from typing import Any, Literal

from plait.config import field_spec as _f, load_toml
from plait.config.parse import _coerce
from plait.errors import ConfigError
from plait.layout import PP_SCHEDULES  # noqa: F401
from plait.plan.hardware import (
    DEFAULT_LINKS, GIGA, Cluster, default_profile_path, load_profile, lookup_gpu, lookup_link,
    parse_node_groups,
)



@dataclass
class PlanModel:
    """The transformer's shape. 0 in a required field means "not given"."""

    n_layers: int = _f(0, "transformer blocks (required)", min=0)
    dim: int = _f(0, "hidden size (required)", min=0)
    n_heads: int = _f(0, "attention heads (required)", min=0)
    n_kv_heads: int = _f(0, "key/value heads; 0 means n_heads", min=0)
    ffn_dim: int = _f(0, "MLP hidden size (required)", min=0)
    vocab_size: int = _f(0, "vocabulary size (required)", min=0)
    mlp: Literal["swiglu", "gelu"] = _f("swiglu", "gated SwiGLU (3 matrices) or GELU (2 matrices)")
    tie_embeddings: bool = _f(False, "output layer shares the embedding matrix")
    moe_experts: int = _f(0, "routed experts per block; 0 = dense", min=0)
    moe_top_k: int = _f(2, "experts each token is routed to", min=1)
    moe_ffn_dim: int = _f(0, "hidden size of each routed expert; 0 = ffn_dim", min=0)
    moe_shared_ffn_dim: int = _f(0, "hidden size of an always-on shared expert; 0 = none", min=0)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def expert_ffn_dim(self) -> int:
        return self.moe_ffn_dim or self.ffn_dim

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.mlp == "swiglu" else 2

    def attention_params(self) -> int:
        """Weights of q, k, v and output projections (elements)."""
        return self.dim * (2 * self.dim + 2 * self.kv_dim)

    def dense_mlp_params(self) -> int:
        return self.mlp_matrices * self.dim * self.ffn_dim

    def expert_params(self) -> int:
        """All routed experts of one block (elements); 0 for a dense model."""
        return self.moe_experts * self.mlp_matrices * self.dim * self.expert_ffn_dim

    def shared_block_params(self) -> int:
        """One block's weights that every expert-parallel rank holds: attention, norms, router,
        the shared expert, or the dense MLP."""
        norms = 2 * self.dim
        if not self.moe_experts:
            return self.attention_params() + self.dense_mlp_params() + norms
        shared = self.mlp_matrices * self.dim * self.moe_shared_ffn_dim
        return self.attention_params() + norms + self.dim * self.moe_experts + shared

    def embedding_params(self) -> int:
        return self.vocab_size * self.dim

    def total_params(self) -> int:
        """Every weight once (tied embeddings counted once), elements."""
        blocks = self.n_layers * (self.shared_block_params() + self.expert_params())
        heads = self.embedding_params() * (1 if self.tie_embeddings else 2)
        return blocks + heads + self.dim


@dataclass
class PlanCluster:
    gpu: str = _f("", "GPU type from the catalog (required): " + ", ".join(DEFAULT_LINKS))
    gpus: int = _f(0, "GPUs in all (required)", min=0)
    gpus_per_node: int = _f(8, "GPUs per node (all of them if fewer)", min=1)
    intra_link: str = _f("", "link inside a node; empty = the GPU's usual one")
    inter_link: str = _f("", "link between nodes, per GPU; empty = the GPU's usual one")
    intra_gbs: float = _f(0.0, "override: intra-node GB/s per GPU per direction; 0 = the link's", min=0)
    inter_gbs: float = _f(0.0, "override: inter-node GB/s per GPU per direction; 0 = the link's", min=0)
    inter_latency_us: float = _f(0.0, "override: inter-node latency in microseconds; 0 = the link's", min=0)
    node_groups: str = _f("", "heterogeneous cluster: 'NODESxLINK,...' in rank order, e.g. '4xib-ndr,4xroce'")
    profile: str = _f("", "cpu: calibration profile (JSON); empty = .plait_cache/plan_profile_cpu.json if present")


@dataclass
class PlanTrain:
    global_batch: int = _f(0, "sequences per optimizer step (required)", min=0)
    seq_len: int = _f(0, "tokens per sequence (required)", min=0)
    dtype: Literal["bf16", "fp8", "fp32"] = _f("bf16", "matmul precision; bf16/fp8 keep fp32 master weights")
    attention: Literal["flash", "eager"] = _f("flash", "fused (flash) attention, or scores materialized")
    kernels: Literal["fused", "eager"] = _f(
        "fused", "fused kernels (Megatron, train.compile), or one operator at a time (plait's eager blocks: several "
        "passes per norm, rotary and activation, and DTensor dispatch per operator under tensor parallelism)")
    sequence_parallel: bool = _f(True, "tensor parallel also splits norms and activations between blocks")
    overlap_grad_reduce: bool = _f(True, "gradient reduction overlaps the last backward (DDP buckets, FSDP)")
    dropout: bool = _f(False, "the model applies dropout (masks stored, extra element-wise passes)")
    pp_schedule: Literal["auto", "gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble",
                         "zbv", "dualpipev"] = _f("auto", "pipeline schedule; auto = 1f1b, interleaved_1f1b when vpp > 1")
    cp_mode: Literal["ring", "ulysses"] = _f("ring", "context-parallel attention")


SECTIONS: dict[str, type] = {"model": PlanModel, "cluster": PlanCluster, "train": PlanTrain}
REQUIRED = {
    "model": ("n_layers", "dim", "n_heads", "ffn_dim", "vocab_size"),
    "cluster": ("gpu", "gpus"),
    "train": ("global_batch", "seq_len"),
}


@dataclass
class PlanRequest:
    model: PlanModel
    cluster: PlanCluster
    train: PlanTrain


def _set(request: PlanRequest, dotted: str, raw: Any, from_cli: bool) -> None:
    section, _, name = dotted.partition(".")
    body = getattr(request, section, None) if section in SECTIONS else None
    names = {f.name: f for f in dataclasses.fields(SECTIONS[section])} if body is not None else {}
    if name not in names:
        if not from_cli:
            return  # a trainer TOML's own fields (train.lr, model.rope_theta, ...) are not the planner's
        known = ", ".join(f"{s}.*" for s in SECTIONS)
        raise ConfigError(f"unknown plan key '{dotted}'; plait plan takes {known} (see 'plait plan --help')")
    hint = typing.get_type_hints(SECTIONS[section])[name]
    value = _coerce(dotted, raw, hint, from_cli)
    meta = names[name].metadata
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{dotted} = {value!r} is out of range; it must be >= {meta['min']}")
    setattr(body, name, value)


def build_request(path: str | None, overrides: list[tuple[str, str]]) -> PlanRequest:
    """Defaults, then the TOML file's model/cluster/train fields, then command-line overrides.
    Raises ConfigError naming the first missing or inconsistent field."""
    request = PlanRequest(PlanModel(), PlanCluster(), PlanTrain())
    if path is not None:
        for section, body in load_toml(path).items():
            if section in SECTIONS and isinstance(body, dict):
                for name, raw in body.items():
                    _set(request, f"{section}.{name}", raw, from_cli=False)
    for dotted, raw in overrides:
        _set(request, dotted, raw, from_cli=True)
    for section, names in REQUIRED.items():
        missing = [f"{section}.{n}" for n in names if not getattr(getattr(request, section), n)]
        if missing:
            raise ConfigError(f"{', '.join(missing)} missing: plait plan needs them (in CONFIG.toml or as --{missing[0]} N)")
    validate_model(request.model)
    return request


def validate_model(m: PlanModel) -> None:
    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim = {m.dim} is not divisible by model.n_heads = {m.n_heads}")
    if m.n_heads % m.kv_heads:
        raise ConfigError(f"model.n_heads = {m.n_heads} is not divisible by model.n_kv_heads = {m.kv_heads}")
    if m.moe_experts and m.moe_top_k > m.moe_experts:
        raise ConfigError(f"model.moe_top_k = {m.moe_top_k} is larger than model.moe_experts = {m.moe_experts}")


def build_cluster(c: PlanCluster) -> Cluster:
    """The Cluster for the ``cluster`` section: catalog GPU, its usual links unless named, overrides."""
    gpu = lookup_gpu(c.gpu)
    intra_name, inter_name = DEFAULT_LINKS[gpu.name]
    intra = lookup_link("cluster.intra_link", c.intra_link or intra_name)
    inter = lookup_link("cluster.inter_link", c.inter_link or inter_name)
    if gpu.name == "cpu":
        path = c.profile or default_profile_path()
        if c.profile or os.path.isfile(path):
            gpu, intra = load_profile(path)
    if c.intra_gbs:
        intra = dataclasses.replace(intra, bytes_per_s=c.intra_gbs * GIGA)
    if c.inter_gbs:
        inter = dataclasses.replace(inter, bytes_per_s=c.inter_gbs * GIGA)
    if c.inter_latency_us:
        inter = dataclasses.replace(inter, latency_s=c.inter_latency_us * 1e-6)
    per_node = min(c.gpus_per_node, c.gpus)
    if c.gpus % per_node:
        raise ConfigError(f"cluster.gpus = {c.gpus} is not a multiple of cluster.gpus_per_node = {per_node}")
    groups = parse_node_groups(c.node_groups) if c.node_groups else ()
    if groups and sum(g.nodes for g in groups) * per_node != c.gpus:
        raise ConfigError(
            f"cluster.node_groups = {c.node_groups!r} lists {sum(g.nodes for g in groups)} nodes of {per_node} GPUs; "
            f"cluster.gpus = {c.gpus} needs {c.gpus // per_node}"
        )
    if groups:
        # Collectives that span every group run at the slowest group's pace.
        inter = min((g.inter_link for g in groups), key=lambda lk: lk.achieved_bytes_per_s)
    return Cluster(gpu, c.gpus, per_node, intra, inter, groups)

