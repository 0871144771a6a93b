"""``parallel.layout = "auto"``: ask the planner for the fastest layout plait can run on this world.

The planner ranks only layouts plait's own rules accept (plait.layout, the ones config validation
runs), so the first one is written into the config and explained on stdout; validating the
result is a safety net.
"""

from __future__ import annotations

import copy
import os

import torch

from plait.config import JobConfig, job_world_size, resolved_cp_shard, validate
from plait.errors import ConfigError
from plait.launch import preflight
from plait.plan.estimate import Estimate
from plait.plan.hardware import GIB
from plait.plan.search import PLAIT_RECOMPUTE, search
from plait.plan.spec import PlanCluster, PlanModel, PlanTrain, build_cluster, refuse_gla

# torch.cuda.get_device_name() fragments -> catalog names; the first match wins.
DEVICE_NAMES = (("H200", "h200"), ("H100 PCIe", "h100-pcie"), ("H100", "h100-sxm"), ("B200", "b200"),
                ("A100-SXM4-40GB", "a100-40gb"), ("A100-PCIE-40GB", "a100-40gb"), ("A100", "a100-80gb"),
                ("MI250X", "mi250x-gcd"))


def catalog_gpu(cfg: JobConfig) -> str:
    """The catalog entry of the device this job trains on ('cpu' without CUDA)."""
    on_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if not on_cuda:
        return "cpu"
    name = torch.cuda.get_device_name()
    for fragment, entry in DEVICE_NAMES:
        if fragment in name:
            return entry
    raise ConfigError(f"parallel.layout = 'auto': the planner has no entry for the GPU '{name}'; set the layout by hand")


def plan_inputs(cfg: JobConfig, world: int) -> tuple[PlanModel, PlanTrain, PlanCluster]:
    m, t = cfg.model, cfg.train
    model = PlanModel(n_layers=m.n_layers, dim=m.dim, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, ffn_dim=m.ffn_dim,
                      vocab_size=m.vocab_size, mlp="swiglu", tie_embeddings=m.tie_embeddings,
                      moe_experts=m.moe_experts, moe_top_k=m.moe_top_k, moe_ffn_dim=m.moe_ffn_dim,
                      moe_shared_ffn_dim=m.moe_shared_ffn_dim)
    train = PlanTrain(global_batch=t.global_batch, seq_len=t.seq_len, dtype="bf16" if t.dtype == "bf16" else "fp32",
                      cp_mode="ulysses" if cfg.parallel.cp_mode == "ulysses" else "ring",
                      kernels="fused" if t.compile else "eager")
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cluster = PlanCluster(gpu=catalog_gpu(cfg), gpus=world, gpus_per_node=per_node)
    return model, train, cluster


def with_layout(cfg: JobConfig, est: Estimate) -> JobConfig:
    """A copy of ``cfg`` running ``est``'s layout."""
    lo, out = est.layout, copy.deepcopy(cfg)
    p = out.parallel
    p.tp, p.pp, p.cp, p.ep, p.zero = lo.tp, lo.pp, lo.cp, lo.ep, lo.zero
    p.pp_virtual_stages, p.pp_schedule = lo.vpp, lo.schedule
    p.dp_replicate, p.dp_shard, p.pp_split, p.layout = 1, -1, "", "manual"
    out.train.micro_batch = lo.micro_batch
    out.train.activation_checkpointing = PLAIT_RECOMPUTE[lo.recompute]
    return out


def trainer_settings(cfg: JobConfig) -> dict:
    """The job's settings that plait's layout rules read and the planner does not model."""
    p = cfg.parallel
    return {"cp_mode": p.cp_mode, "cp_ulysses": p.cp_ulysses, "cp_shard": resolved_cp_shard(cfg),
            "moe_balance_scope": cfg.moe.balance_scope, "profile_pipeline": cfg.metrics.profile_pipeline}


def apply_auto_layout(cfg: JobConfig) -> JobConfig:
    """The config with the planner's best runnable layout for this world; prints the choice."""
    world = job_world_size(cfg)
    refuse_gla(cfg.model, "parallel.layout = 'auto'")
    if not cfg.model.vocab_size:
        cfg = preflight(cfg, world)  # the tokenizer decides the vocabulary, and so the output layer
    model, train, cluster_spec = plan_inputs(cfg, world)
    cluster, job = build_cluster(cluster_spec), trainer_settings(cfg)
    result = search(model, train, cluster, {"recompute": "none"}, job=job)
    if not result.ranked:
        result = search(model, train, cluster, {"recompute": "full"}, job=job)
    if not result.ranked:
        raise ConfigError(f"parallel.layout = 'auto': no layout plait can run fits {world} x {cluster_spec.gpu}")
    est = result.ranked[0]
    chosen = with_layout(cfg, est)
    validate(chosen, world)  # safety net: the planner ranks only layouts these rules accept
    runner_up = next((e for e in result.ranked[1:] if e.layout != est.layout), None)
    print(f"plait: parallel.layout = auto on {world} x {cluster_spec.gpu}: {est.layout.text()} "
          f"(schedule {est.layout.schedule}), predicted {est.step_time_s:.3g} s per step, "
          f"{est.memory.total / GIB:.2f} GiB per rank", flush=True)
    if runner_up is not None:
        print(f"plait: next best {runner_up.layout.text()}, {runner_up.step_time_s:.3g} s; "
              f"{len(result.ranked)} layouts fit", flush=True)
    for line in result.why_lost(1, limit=3):
        print(f"plait:   lost: {line}", flush=True)
    return chosen
