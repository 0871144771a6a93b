"""What the planner is asked about: the model, the cluster and the training job, as typed sections.

``PlanModel`` and ``PlanTrain`` are the trainer's ``ModelConfig`` and ``TrainConfig`` (same fields,
defaults, limits and docs) plus what only the planner needs (``model.mlp``, how kernels and overlap
behave in ``train``, fp8 in ``train.dtype``); ``cluster`` is the planner's own section. One TOML file
serves both ``plait train`` and ``plait plan``, read by the one parser (``plait.config.parse``): a
trainer TOML's other sections and fields are ignored; on the command line every key must be one of
these.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Literal

from plait.config import ModelConfig, ParallelConfig, TrainConfig, field_spec as _f
from plait.config.parse import apply_toml, has_key, sections_of, set_key
from plait.errors import ConfigError
from plait.plan.hardware import (
    DEFAULT_LINKS, GIGA, Cluster, default_profile_path, load_profile, lookup_gpu, lookup_link,
    parse_node_groups, parse_profile,
)

_SCHEDULES = typing.get_type_hints(ParallelConfig)["pp_schedule"]  # the trainer's pipeline schedules
# The largest cluster the planner searches (2**20 GPUs): far above any built, and small enough that
# enumerating its layouts stays quick.
MAX_GPUS = 1_048_576


@dataclass
class PlanModel(ModelConfig):
    """The trainer's model section, plus the MLP kind, with the sizes the cost model counts."""

    mlp: Literal["swiglu", "gelu"] = _f("swiglu", "gated SwiGLU (3 matrices) or GELU (2 matrices)")

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
    gpus: int = _f(0, "GPUs in all (required)", min=1, max=MAX_GPUS)
    gpus_per_node: int = _f(8, "GPUs per node (all of them if fewer)", min=1)
    intra_link: str = _f("", "link inside a node; empty = the GPU's usual one")
    inter_link: str = _f("", "link between nodes, per GPU; empty = the GPU's usual one")
    intra_gbs: float = _f(0.0, "override: intra-node GB/s per GPU per direction; 0 = the link's", min=0)
    inter_gbs: float = _f(0.0, "override: inter-node GB/s per GPU per direction; 0 = the link's", min=0)
    inter_latency_us: float = _f(0.0, "override: inter-node latency in microseconds (messages and collective steps); 0 = the link's", min=0)
    nodes_per_leaf: int = _f(32, "nodes under one leaf switch of the network (per rail); groups spanning more "
                                 "cross the spine, which adds switch hops and loses bandwidth to flow collisions", min=2)
    node_groups: str = _f("", "heterogeneous cluster: 'NODESxLINK,...' in rank order, e.g. '4xib-ndr,4xroce'")
    profile: str = _f("", "cpu: calibration profile (JSON); empty = .plait_cache/plan_profile_cpu.json if present")


@dataclass
class PlanTrain(TrainConfig):
    """The trainer's train section, plus how the framework runs the layout. ``dtype`` is the
    planner's own: it also prices fp8, and defaults to bf16 (the usual precision at scale)."""

    dtype: Literal["bf16", "fp8", "fp32"] = _f("bf16", "matmul precision; bf16/fp8 keep fp32 master weights")
    attention: Literal["flash", "eager"] = _f("flash", "fused (flash) attention, or scores materialized")
    kernels: Literal["fused", "eager"] = _f(
        "fused", "fused kernels (Megatron, train.compile), or one operator at a time (plait's eager blocks: several "
        "passes per norm, rotary and activation, and DTensor dispatch per operator under tensor parallelism)")
    sequence_parallel: bool = _f(True, "tensor parallel also splits norms and activations between blocks")
    overlap_grad_reduce: bool = _f(True, "gradient reduction overlaps the last backward (DDP buckets, FSDP)")
    dropout: bool = _f(False, "the model applies dropout (masks stored, extra element-wise passes)")
    pp_schedule: Literal["auto", _SCHEDULES] = _f("auto", "pipeline schedule; auto = 1f1b, interleaved_1f1b when vpp > 1")
    cp_mode: Literal["ring", "ulysses"] = _f("ring", "context-parallel attention")


@dataclass
class PlanRequest:
    model: PlanModel = field(default_factory=PlanModel)
    cluster: PlanCluster = field(default_factory=PlanCluster)
    train: PlanTrain = field(default_factory=PlanTrain)


# Given in the TOML file or on the command line: the trainer's defaults are no model to plan for.
REQUIRED = {
    "model": ("n_layers", "dim", "n_heads", "ffn_dim", "vocab_size"),
    "cluster": ("gpu", "gpus"),
    "train": ("global_batch", "seq_len"),
}


def build_request(path: str | None, overrides: list[tuple[str, str]]) -> PlanRequest:
    """Defaults, then the TOML file's model/cluster/train fields, then command-line overrides.
    Raises ConfigError naming the first missing or inconsistent field."""
    request = PlanRequest()
    given = apply_toml(request, path, known_only=True) if path is not None else set()
    for dotted, raw in overrides:
        if not has_key(request, dotted):
            known = ", ".join(f"{s}.*" for s in sections_of(request))
            raise ConfigError(f"unknown plan key '{dotted}'; plait plan takes {known} (see 'plait plan --help')")
        set_key(request, dotted, raw, from_cli=True)
        given.add(dotted)
    for section, names in REQUIRED.items():
        missing = [f"{section}.{n}" for n in names if f"{section}.{n}" not in given]
        if missing:
            raise ConfigError(f"{', '.join(missing)} missing: plait plan needs them (in CONFIG.toml or as --{missing[0]} N)")
    validate_model(request.model)
    return request


def validate_model(m: PlanModel) -> None:
    """The trainer's model rules, and a vocabulary the planner can count."""
    m.check_shape()
    refuse_gla(m, "plait plan")
    if not m.vocab_size:
        raise ConfigError("model.vocab_size = 0 takes the tokenizer's in plait train; plait plan needs the number")


def refuse_gla(m, who: str) -> None:
    """The cost model prices softmax attention only: a model with GLA layers is refused, not mispriced."""
    if m.has_gla():
        raise ConfigError(f"{who} models softmax attention only, and this model has GLA layers (model.attention, "
                          "model.layer_pattern); set the layout by hand")


def build_cluster(c: PlanCluster, profile_data: dict | None = None) -> Cluster:
    """The Cluster for the ``cluster`` section: catalog GPU, its usual links unless named, overrides.
    ``profile_data``: a calibration profile's fields, for a cpu cluster, instead of its file."""
    gpu = lookup_gpu(c.gpu)
    intra_name, inter_name = DEFAULT_LINKS[gpu.name]
    intra = lookup_link("cluster.intra_link", c.intra_link or intra_name)
    inter = lookup_link("cluster.inter_link", c.inter_link or inter_name)
    if gpu.name == "cpu" and profile_data is not None:
        gpu, intra = parse_profile(profile_data)
    elif gpu.name == "cpu":
        path = c.profile or default_profile_path()
        if c.profile or os.path.isfile(path):
            gpu, intra = load_profile(path)
    if c.intra_gbs:
        intra = dataclasses.replace(intra, bytes_per_s=c.intra_gbs * GIGA)
    if c.inter_gbs:
        inter = dataclasses.replace(inter, bytes_per_s=c.inter_gbs * GIGA)
    if c.inter_latency_us:
        inter = dataclasses.replace(inter, latency_s=c.inter_latency_us * 1e-6, collective_step_s=None)
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
    return Cluster(gpu, c.gpus, per_node, intra, inter, groups, nodes_per_leaf=c.nodes_per_leaf)

