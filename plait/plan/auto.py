"""``parallel.layout = "auto"``: ask the planner for the fastest layout plait can run on this world.

The planner ranks only layouts plait's own rules accept (plait.layout, the ones config validation
runs), so the first one is written into the config and explained on stdout; validating the
result is a safety net. Its [memory] options (offload, activation offload, token-wise recompute)
go into ``cfg.memory``; those the job sets away from their defaults are kept as given. With
``train.micro_batch = "auto"`` the trial on the device picks the micro-batch at start: the
planner's only ranks the layouts.
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
from plait.plan.job import plan_model, plan_train
from plait.plan.report import memory_options
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
    model, train = plan_model(cfg), plan_train(cfg)
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
    if cfg.train.micro_batch != "auto":  # auto: the trial at start picks it
        out.train.micro_batch = lo.micro_batch
    out.train.activation_checkpointing = PLAIT_RECOMPUTE[lo.recompute]
    out.memory.offload, out.memory.activation_offload = lo.offload, lo.activation_offload
    out.memory.recompute_fraction = lo.recompute_fraction
    return out


def fixed_memory_options(cfg: JobConfig) -> dict:
    """The [memory] options the job sets away from their defaults: the search keeps them."""
    mem, fixed = cfg.memory, {}
    if mem.offload != "none":
        fixed["offload"] = mem.offload
    if mem.activation_offload:
        fixed["activation_offload"] = mem.activation_offload
    if mem.recompute_fraction:
        fixed["recompute_fraction"] = mem.recompute_fraction
    return fixed


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
    fixed = fixed_memory_options(cfg)
    result = search(model, train, cluster, {"recompute": "none", **fixed}, job=job)
    if not result.ranked:
        result = search(model, train, cluster, {"recompute": "full", **fixed}, job=job)
    if not result.ranked:
        raise ConfigError(f"parallel.layout = 'auto': no layout plait can run fits {world} x {cluster_spec.gpu}")
    est = result.ranked[0]
    chosen = with_layout(cfg, est)
    validate(chosen, world)  # safety net: the planner ranks only layouts these rules accept
    runner_up = next((e for e in result.ranked[1:] if e.layout != est.layout), None)
    print(f"plait: parallel.layout = auto on {world} x {cluster_spec.gpu}: {est.layout.text()} "
          f"(schedule {est.layout.schedule}, memory options {memory_options(est.layout)}), predicted "
          f"{est.step_time_s:.3g} s per step, {est.memory.total / GIB:.2f} GiB per rank"
          + (f" and {est.memory.host.total / GIB:.2f} GiB of host memory" if est.memory.host.total else ""),
          flush=True)
    if runner_up is not None:
        print(f"plait: next best {runner_up.layout.text()}, {runner_up.step_time_s:.3g} s; "
              f"{len(result.ranked)} layouts fit", flush=True)
    for line in result.why_lost(1, limit=3):
        print(f"plait:   lost: {line}", flush=True)
    return chosen
