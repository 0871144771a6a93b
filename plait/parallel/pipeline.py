"""Pipeline parallelism on the ``pp`` mesh dim with torch.distributed.pipelining.

The layer list is cut into ``pp × pp_virtual_stages`` contiguous stages. Rank r of the pipeline
holds stages r, r+pp, r+2pp, ... (loop order), or r and 2pp−1−r for the V-shaped schedules
(zbv, dualpipev), so the first and last stage share a rank. Each stage is a model built on the
meta device that keeps only its layers (plus the embedding on the first stage and the norm and output on
the last). Between stages only activations travel: per micro-batch, b·s·h elements forward
(divided by tp under sequence parallel) and the same backward.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as pp_schedules

from plait.config import PP_MULTI_STAGE, PP_V_SHAPED, JobConfig, ModelConfig, pp_stage_layers
from plait.layout import SCHEDULES as LAYOUT_SCHEDULES
from plait.models import flops
from plait.models.llama import Llama

# parallel.pp_schedule -> class name in torch.distributed.pipelining.schedules (plait.layout's table).
SCHEDULES = {name: sched.torch_class for name, sched in LAYOUT_SCHEDULES.items()}


def layer_costs(cfg: JobConfig) -> tuple[list[float], float, float]:
    """Relative compute cost of each block, of the embedding and of the norm + output layer
    (multiply-adds per token: ``plait.models.flops.layer_costs``)."""
    return flops.layer_costs(cfg.model, cfg.train.seq_len)


def split_layers(cfg: JobConfig) -> list[list[int]]:
    """Layer indices of each stage: ``parallel.pp_split`` when given, else the contiguous split
    that minimizes the most expensive stage (the pipeline runs at the pace of its slowest)."""
    n_stages = cfg.parallel.pp * cfg.parallel.pp_virtual_stages
    counts = pp_stage_layers(cfg)
    if counts is None:
        costs, first_extra, last_extra = layer_costs(cfg)
        counts = _balanced_counts(costs, n_stages, first_extra, last_extra)
    stages, start = [], 0
    for count in counts:
        stages.append(list(range(start, start + count)))
        start += count
    return stages


def _balanced_counts(costs: list[float], n_stages: int, first_extra: float, last_extra: float) -> list[int]:
    """Dynamic programme over cut points: min over splits of the max stage cost."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, lo: int, hi: int) -> float:
        extra = (first_extra if stage == 0 else 0.0) + (last_extra if stage == n_stages - 1 else 0.0)
        return prefix[hi] - prefix[lo] + extra

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for hi in range(s, n - (n_stages - s) + 1):
            for lo in range(s - 1, hi):
                value = max(best[s - 1][lo], cost(s - 1, lo, hi))
                if value < best[s][hi]:
                    best[s][hi], cut[s][hi] = value, lo
    counts, hi = [], n
    for s in range(n_stages, 0, -1):
        lo = cut[s][hi]
        counts.append(hi - lo)
        hi = lo
    return counts[::-1]


def stage_ids(pp_rank: int, cfg: JobConfig) -> list[int]:
    """Global indices of the stages this pipeline rank holds."""
    pp, v = cfg.parallel.pp, cfg.parallel.pp_virtual_stages
    if cfg.parallel.pp_schedule in PP_V_SHAPED:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(v)]


def stage_owner(stage: int, cfg: JobConfig) -> int:
    """The pipeline rank that holds global stage ``stage``."""
    pp = cfg.parallel.pp
    if cfg.parallel.pp_schedule in PP_V_SHAPED:
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def stage_module(model_cfg: ModelConfig, layers: list[int], first: bool, last: bool) -> nn.Module:
    """A model on the meta device keeping only ``layers`` (names unchanged), the embedding if
    ``first``, the final norm and output if ``last``: nothing is allocated until the layout is
    applied and the stage is materialized (:mod:`plait.parallel.materialize`)."""
    with torch.device("meta"):
        stage = Llama(model_cfg)
    keep = {str(i) for i in layers}
    for name in [n for n in stage.layers.keys() if n not in keep]:
        del stage.layers[name]
    if not first:
        stage.tok_embeddings = None
    if not last:
        stage.norm = None
        stage.output = None
    return stage


def build_pipeline(cfg: JobConfig, pp_rank: int) -> tuple[list[nn.Module], list[int]]:
    """This rank's stage modules (on meta) and their global stage ids."""
    layers = split_layers(cfg)
    n_stages = len(layers)
    ids = stage_ids(pp_rank, cfg)
    modules = [stage_module(cfg.model, layers[i], i == 0, i == n_stages - 1) for i in ids]
    return modules, ids


def build_schedule(
    modules: list[nn.Module], ids: list[int], cfg: JobConfig, n_microbatches: int,
    loss_fn: Callable, pp_group, device: torch.device,
):
    """The torch pipelining schedule named by ``parallel.pp_schedule`` over this rank's stages.

    Gradients are not scaled by the schedule: the loss is already normalized by the global
    token count, as in every other layout.
    """
    n_stages = cfg.parallel.pp * cfg.parallel.pp_virtual_stages
    stages = [PipelineStage(m, i, n_stages, device, group=pp_group) for m, i in zip(modules, ids)]
    cls = getattr(pp_schedules, SCHEDULES[cfg.parallel.pp_schedule])
    multi = cfg.parallel.pp_schedule in PP_MULTI_STAGE
    return cls(stages if multi else stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False), stages
