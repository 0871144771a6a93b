"""Enumerate the layouts that divide the cluster and the model, drop those that do not fit, rank.

The space is every (tp, cp, pp, vpp, dp, ep, micro-batch, ZeRO stage, recompute) the model and
batch allow, with tp kept inside one node (a tensor-parallel all-reduce per block over the
network is never the fast choice) and ZeRO stages collapsed when there is nothing to shard.
Fields fixed by ``--layout`` are not searched.

Only layouts ``plait train`` accepts are ranked: each candidate goes through plait.layout's rules,
the ones the trainer's config validation runs, and the trainer's limits on the [memory] options.

The [memory] options (offload of the optimizer or of the parameters, activation offload of every
block but the last, token-wise recompute of a quarter, half or three quarters of the tokens) only
cost time for a given layout, so they are tried only on a layout that does not fit without them,
and the fastest combination that fits stands for it. A layout fixed in full by ``--layout`` (or with
recompute = selective, Megatron's attention-core recompute, which plait does not implement) is
still estimated, and ``SearchResult.refused`` says why plait would not run it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, fields, replace

from plait.config.memory_rules import memory_problem as trainer_memory_problem
from plait.errors import ConfigError
from plait.plan.estimate import Estimate, estimate
from plait.plan.hardware import GIB, Cluster
from plait.layout import INT_FIELDS, OFFLOAD, Degrees, Layout, Workload, resolve_schedule
from plait.layout import layout_problem as trainer_problem
from plait.plan.memory import fits, memory_per_gpu
from plait.plan.spec import PlanModel, PlanTrain

SEARCHED_RECOMPUTE = ("none", "op", "full")  # "selective" (attention core) only when --layout asks for it
PLAIT_RECOMPUTE = {"none": "none", "op": "op", "full": "full"}  # planner recompute -> train.activation_checkpointing
DEGREE_FIELDS = frozenset(f.name for f in fields(Degrees))
RECOMPUTE_FRACTIONS = (0.25, 0.5, 0.75)  # memory.recompute_fraction values searched


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` in increasing order, found in sqrt(n) steps (a batch or layer count
    can be large)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def model_problem(model: PlanModel, train: PlanTrain, cluster: Cluster, layout: Layout) -> str | None:
    """Why the cost model cannot estimate ``layout`` on this cluster, or None when it can."""
    lo = layout
    if lo.gpus != cluster.gpus:
        return (f"layout tp x pp x dp x cp = {lo.tp} x {lo.pp} x {lo.dp} x {lo.cp} = {lo.gpus} "
                f"does not match cluster.gpus = {cluster.gpus}")
    if model.n_heads % lo.tp or model.kv_heads % lo.tp or model.ffn_dim % lo.tp:
        return (f"tp = {lo.tp} must divide model.n_heads = {model.n_heads}, the KV heads ({model.kv_heads}) "
                f"and model.ffn_dim = {model.ffn_dim}")
    if model.n_layers % (lo.pp * lo.vpp):  # the estimate gives every stage the same layers
        return f"pp x vpp = {lo.pp} x {lo.vpp} must divide model.n_layers = {model.n_layers}"
    if train.global_batch % (lo.dp * lo.micro_batch):
        return (f"train.global_batch = {train.global_batch} is not a multiple of dp x micro-batch = "
                f"{lo.dp} x {lo.micro_batch}")
    return None


def plait_problem(model: PlanModel, train: PlanTrain, layout: Layout, job: dict | None = None) -> str | None:
    """Why ``plait train`` would refuse ``layout`` (plait.layout's rules, the trainer's own), or
    None when it runs it. ``job``: the trainer's own settings the planner does not model, by
    plait.layout.Degrees / Workload field name (moe_balance_scope, profile_pipeline, cp_mode, ...);
    left out, the trainer's defaults."""
    if layout.recompute not in PLAIT_RECOMPUTE:
        return f"recompute = '{layout.recompute}' (attention-core recompute) has no plait equivalent"
    memory = memory_problem(model, train, layout)
    if memory:
        return memory
    work = Workload(n_layers=model.n_layers, n_heads=model.n_heads, n_kv_heads=model.n_kv_heads,
                    ffn_dim=model.ffn_dim, seq_len=train.seq_len, global_batch=train.global_batch,
                    micro_batch=layout.micro_batch, moe_experts=model.moe_experts,
                    tie_embeddings=model.tie_embeddings, activation_checkpointing=PLAIT_RECOMPUTE[layout.recompute])
    degrees = layout.degrees(train.cp_mode)
    if job:
        degrees = replace(degrees, **{k: v for k, v in job.items() if k in DEGREE_FIELDS})
        work = replace(work, **{k: v for k, v in job.items() if k not in DEGREE_FIELDS})
    return trainer_problem(degrees, work)


def memory_problem(model: PlanModel, train: PlanTrain, layout: Layout) -> str | None:
    """Why the trainer would refuse ``layout``'s [memory] options, or None (the trainer's own
    rules, plait/config/memory_rules.py; the planner's recompute names map to its checkpointing
    modes, and it plans softmax models only)."""
    return trainer_memory_problem(layout.offload, layout.activation_offload, layout.recompute_fraction,
                                  checkpointing=layout.recompute, tp=layout.tp, zero=layout.zero, ep=layout.ep,
                                  moe=bool(model.moe_experts), gla=False, compiled=train.compile)


def memory_variants(model: PlanModel, layout: Layout, fixed: dict) -> list[Layout]:
    """``layout`` with every combination of the [memory] options ``fixed`` leaves open (offload
    none | optimizer | params, activation offload none | all blocks but the last, token-wise
    recompute none | RECOMPUTE_FRACTIONS), ``layout`` itself left out."""
    offloads = _options(fixed, "offload", list(OFFLOAD))
    blocks = _options(fixed, "activation_offload", [0, model.n_layers - 1] if model.n_layers > 1 else [0])
    fractions = _options(fixed, "recompute_fraction", [0.0, *RECOMPUTE_FRACTIONS])
    lo = layout  # built directly: dataclasses.replace is the slow part of a large search
    degrees = (lo.tp, lo.pp, lo.vpp, lo.dp, lo.cp, lo.ep, lo.micro_batch, lo.zero, lo.recompute, lo.schedule)
    variants = (Layout(*degrees, o, a, f) for o, a, f in itertools.product(offloads, blocks, fractions))
    return [v for v in variants if v != layout]


def layout_problem(model: PlanModel, train: PlanTrain, cluster: Cluster, layout: Layout,
                   job: dict | None = None) -> str | None:
    """Why ``layout`` cannot run this model on this cluster (the cost model's restrictions, then
    plait's rules), or None when it can."""
    return model_problem(model, train, cluster, layout) or plait_problem(model, train, layout, job)


@dataclass
class SearchResult:
    ranked: list[Estimate]  # every layout that fits, fastest first
    too_big: list[Estimate]  # valid layouts that do not fit in memory (the first 4096)
    too_big_count: int
    invalid: int  # combinations that do not divide the cluster or the model
    placements: dict = field(default_factory=dict)  # Layout -> hetero.HeteroPlacement (mixed NICs)
    refused: dict = field(default_factory=dict)  # Layout -> why plait train refuses it (layouts fixed by --layout)

    def why_lost(self, shown: int, limit: int = 6) -> list[str]:
        """One line for each family (tp, pp, cp) that did not make the top ``shown``: what made its
        best member slower than the winner, or how far it is from fitting."""
        if not self.ranked:
            return []
        best = self.ranked[0]
        families_shown = {(e.layout.tp, e.layout.pp, e.layout.cp) for e in self.ranked[:shown]}
        lines, seen = [], set(families_shown)
        for est in self.ranked[shown:]:
            family = (est.layout.tp, est.layout.pp, est.layout.cp)
            if family in seen:
                continue
            seen.add(family)
            lines.append(f"{est.layout.text()}: {100 * (est.step_time_s / best.step_time_s - 1):.0f}% slower, "
                         f"{_main_loss(best, est)}")
            if len(lines) == limit:
                return lines
        for est in sorted(self.too_big, key=lambda e: e.memory.total):
            family = (est.layout.tp, est.layout.pp, est.layout.cp)
            if family in seen:
                continue
            seen.add(family)
            lines.append(f"{est.layout.text()}: does not fit, {est.memory.total / GIB:.1f} GiB per GPU")
            if len(lines) == limit:
                break
        return lines


def _parts(est: Estimate) -> dict[str, float]:
    parts = {"compute": est.compute_s, "bubble": est.bubble_s, "optimizer": est.optimizer_s}
    parts.update({f"{k} communication": v for k, v in est.exposed_comm_s.items()})
    return parts


def _main_loss(best: Estimate, other: Estimate) -> str:
    """The component where ``other`` loses most time against ``best``."""
    a, b = _parts(best), _parts(other)
    name = max(b, key=lambda k: b[k] - a[k])
    return f"mostly {name} (+{b[name] - a[name]:.3g} s)"


def _options(fixed: dict, key: str, values: list) -> list:
    return [fixed[key]] if key in fixed else values


def search(model: PlanModel, train: PlanTrain, cluster: Cluster, fixed: dict | None = None,
           max_micro_batch: bool = False, job: dict | None = None) -> SearchResult:
    """Every layout allowed by ``fixed`` (from ``--layout``) that plait can run, estimated; fitting
    ones ranked by step time. With ``max_micro_batch`` only the largest fitting micro-batch of each
    layout is kept (fitting without [memory] options when one does); ``job`` as for ``plait_problem``. A layout ``fixed`` names in full (or with
    recompute = selective) is kept even when plait would refuse it, with the reason in ``refused``."""
    fixed = fixed or {}
    keep_refused = all(k in fixed for k in INT_FIELDS + ("recompute",)) or fixed.get("recompute") == "selective"
    refused: dict[Layout, str] = {}
    n = cluster.gpus
    tps = _options(fixed, "tp", [d for d in divisors(min(n, cluster.gpus_per_node)) if model.n_heads % d == 0])
    cps = _options(fixed, "cp", [d for d in divisors(n) if d <= 16])
    pps = _options(fixed, "pp", [d for d in divisors(n) if model.n_layers % d == 0])
    zeros = _options(fixed, "zero", [0, 1, 2, 3])
    recomputes = _options(fixed, "recompute", list(SEARCHED_RECOMPUTE))
    ranked, too_big, too_big_count, invalid = [], [], 0, 0
    for tp, cp, pp in itertools.product(tps, cps, pps):
        if n % (tp * cp * pp):
            invalid += 1
            continue
        dp = fixed.get("dp", n // (tp * cp * pp))
        if "vpp" in fixed:
            vpps = [fixed["vpp"]]
        else:
            vpps = [1] if pp == 1 else [v for v in divisors(model.n_layers // pp) if v <= 8]
        eps = _options(fixed, "ep", [d for d in divisors(dp * cp) if model.moe_experts and model.moe_experts % d == 0]
                       or [1])
        per_rank = max(1, train.global_batch // max(1, dp))
        mbss = _options(fixed, "mbs", [d for d in divisors(per_rank) if d <= 64])
        for vpp, ep in itertools.product(vpps, eps):
            schedule = fixed.get("schedule", resolve_schedule(train.pp_schedule, pp, vpp))
            stage_zeros = [0] if dp * cp == 1 and "zero" not in fixed else zeros
            for zero, recompute in itertools.product(stage_zeros, recomputes):
                fitting: list[Estimate] = []
                bases: set[Layout] = set()  # layouts that fit without extra [memory] options
                for mbs in mbss:
                    layout = Layout(tp, pp, vpp, dp, cp, ep, mbs, zero, recompute, schedule,
                                    fixed.get("offload", "none"), fixed.get("activation_offload", 0),
                                    fixed.get("recompute_fraction", 0.0))
                    if model_problem(model, train, cluster, layout):
                        invalid += 1
                        continue
                    refusal = plait_problem(model, train, layout, job)
                    if refusal and not keep_refused:
                        invalid += 1
                        continue
                    if refusal:
                        refused[layout] = refusal
                    best, closest = _fit(model, train, cluster, layout, fixed)
                    if best is None:
                        too_big_count += 1
                        if len(too_big) < 4096:  # enough to say how far each family is from fitting
                            too_big.append(estimate(model, train, cluster, closest))
                        continue
                    if refusal and best.layout != layout:
                        refused[best.layout] = refusal
                    if best.layout == layout:
                        bases.add(layout)
                    fitting.append(best)
                if max_micro_batch and fitting:
                    # The largest micro-batch that fits as it is; one that needs [memory]
                    # options to fit only when none does.
                    plain = [e for e in fitting if e.layout in bases] or fitting
                    fitting = [max(plain, key=lambda e: e.layout.micro_batch)]
                ranked.extend(fitting)
    ranked.sort(key=lambda e: e.step_time_s)
    return SearchResult(ranked, too_big, too_big_count, invalid, refused=refused)


def _fit(model: PlanModel, train: PlanTrain, cluster: Cluster, layout: Layout,
         fixed: dict) -> tuple[Estimate | None, Layout]:
    """(the fastest estimate of ``layout`` or of one of its memory variants that fits, or None;
    the candidate that needs the least device memory). ``layout`` itself when it fits: the
    variants only add time."""
    gpu = cluster.gpu
    memory = memory_per_gpu(model, train, layout, gpu)
    if fits(memory, gpu):
        return estimate(model, train, cluster, layout), layout
    closest, least = layout, memory.total
    variants = [v for v in memory_variants(model, layout, fixed) if not memory_problem(model, train, v)]
    # Each option lowers the device bytes (with three blocks or more on the stage): when the
    # variants with the most options leave too much on the device, none fits.
    most: dict[str, Layout] = {}
    for variant in variants:
        if variant.offload not in most or _option_weight(variant) > _option_weight(most[variant.offload]):
            most[variant.offload] = variant
    if -(-model.n_layers // layout.pp) >= 3 and most:
        device = {v: memory_per_gpu(model, train, v, gpu).total for v in most.values()}
        if min(device.values()) > gpu.memory_bytes:
            return None, min(device, key=device.__getitem__)
    fitting: list[Layout] = []
    # Fewer options first: a variant that adds options to one that fits is slower, and skipped.
    for variant in sorted(variants, key=_option_weight):
        if any(_fewer_options(smaller, variant) for smaller in fitting):
            continue
        memory = memory_per_gpu(model, train, variant, gpu)
        if fits(memory, gpu):
            fitting.append(variant)
        elif memory.total < least:
            closest, least = variant, memory.total
    estimates = (estimate(model, train, cluster, variant) for variant in fitting)
    return min(estimates, key=lambda e: e.step_time_s, default=None), closest


def _option_weight(layout: Layout) -> float:
    return (layout.offload != "none") + (layout.activation_offload != 0) + layout.recompute_fraction


def _fewer_options(a: Layout, b: Layout) -> bool:
    """Whether ``b`` uses every [memory] option ``a`` does, at least as much (so costs more time)."""
    return (a.offload in ("none", b.offload) and a.activation_offload in (0, b.activation_offload)
            and a.recompute_fraction <= b.recompute_fraction)


def evaluate_fixed(model: PlanModel, train: PlanTrain, cluster: Cluster, fixed: dict,
                   max_micro_batch: bool = False) -> SearchResult:
    """Search with ``--layout``'s fields fixed; raises ConfigError when nothing is left to run,
    naming what is wrong with the layout as given."""
    if all(k in fixed for k in ("tp", "pp", "cp", "dp")):
        product = fixed["tp"] * fixed["pp"] * fixed["cp"] * fixed["dp"]
        if product != cluster.gpus:
            raise ConfigError(
                f"--layout tp x pp x dp x cp = {fixed['tp']} x {fixed['pp']} x {fixed['dp']} x {fixed['cp']} = "
                f"{product} does not divide the cluster: cluster.gpus = {cluster.gpus}"
            )
    product = 1
    for key in ("tp", "pp", "cp", "dp"):
        product *= fixed.get(key, 1)
    if cluster.gpus % product:
        raise ConfigError(f"--layout fixes {product} GPUs per replica, which does not divide cluster.gpus = {cluster.gpus}")
    result = search(model, train, cluster, fixed, max_micro_batch)
    if not result.ranked and not result.too_big:
        probe = Layout(fixed.get("tp", 1), fixed.get("pp", 1), fixed.get("vpp", 1),
                       fixed.get("dp", cluster.gpus // product), fixed.get("cp", 1), fixed.get("ep", 1),
                       fixed.get("mbs", 1), fixed.get("zero", 0), fixed.get("recompute", "none"),
                       fixed.get("schedule", resolve_schedule(train.pp_schedule, fixed.get("pp", 1), fixed.get("vpp", 1))),
                       fixed.get("offload", "none"), fixed.get("activation_offload", 0),
                       fixed.get("recompute_fraction", 0.0))
        reason = layout_problem(model, train, cluster, probe) or "no micro-batch divides the batch"
        raise ConfigError(f"--layout: no layout with these fields can run: {reason}")
    return result

