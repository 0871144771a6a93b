"""How far to trust a prediction: the cost model checked on runs it was never fitted to.

Calibration and validation data are kept apart:

- **Calibration** (what the constants were set from): on GPUs, the 10 rows of Megatron-LM's
  Table 1 (bench/planner_published.py; GEMM, HBM and link efficiencies); on a CPU, the
  micro-benchmarks of ``plait plan --cluster.gpu cpu --calibrate`` (GEMMs, memory, operators,
  collectives, sends), which never time a training step of a layout.
- **Validation** (never used to set a constant): ``PUBLISHED_RUNS``, published training runs of
  other papers and frameworks, and ``plait.plan.local_runs``, plait's own training steps on the
  dev machine's 4 CPU ranks (bench/planner_local.py --save-validation), each predicted with the
  calibration profile measured just before it.

Each layout belongs to a class by the parallelism that dominates its communication
(``layout_class``). A prediction's uncertainty is the root-mean-square relative error of the
validation runs of its class on its kind of hardware; a class with fewer than
``MIN_CLASS_RUNS`` runs uses all of that hardware's runs. ``leave_one_out`` checks the bands
themselves: each run's band built from the other runs only, and how many runs fall inside it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from plait.layout import Layout, resolve_schedule
from plait.plan.estimate import estimate
from plait.plan.spec import PlanCluster, PlanModel, PlanTrain, build_cluster

MIN_CLASS_RUNS = 3
CLASSES = ("pipeline", "context", "tensor", "sharded", "replicated")


def layout_class(layout: Layout) -> str:
    """The parallelism that dominates a layout's communication: pipeline > context > tensor >
    sharded data parallel (ZeRO-3) > replicated data parallel (ZeRO-0/1/2)."""
    if layout.pp > 1:
        return "pipeline"
    if layout.cp > 1:
        return "context"
    if layout.tp > 1:
        return "tensor"
    return "sharded" if layout.zero == 3 else "replicated"


@dataclass(frozen=True)
class ValidationRun:
    """One measured step: what ran (planner sections and layout) and how long it took."""

    name: str
    source: str
    model: dict
    train: dict
    cluster: dict
    layout: dict
    measured_s: float
    profile: dict | None = None  # CPU runs: the calibration profile measured before them

    def predict(self) -> float:
        layout = dict(self.layout)
        layout.setdefault("schedule", resolve_schedule("auto", layout["pp"], layout["vpp"]))
        cluster = build_cluster(PlanCluster(**self.cluster), self.profile)
        return estimate(PlanModel(**self.model), PlanTrain(**self.train), cluster, Layout(**layout)).step_time_s

    def error(self) -> float:
        """Relative error of the prediction: predicted / measured - 1."""
        return self.predict() / self.measured_s - 1

    @property
    def layout_class(self) -> str:
        return layout_class(Layout(**{"schedule": "1f1b", **self.layout}))


def _megatron(name: str, source: str, layers: int, hidden: int, heads: int, tp: int, pp: int, gpus: int,
              batch: int, recompute: str, seconds: float, sequence_parallel: bool, zero: int = 0) -> ValidationRun:
    """A GPT run of Megatron-LM's lineage on A100 80GB DGX nodes (NVLink3, one HDR NIC per GPU):
    GELU 4h, V = 51,200, s = 2,048, dropout, attention scores materialized, micro-batch 1."""
    return ValidationRun(
        name, source,
        model={"n_layers": layers, "dim": hidden, "n_heads": heads, "ffn_dim": 4 * hidden, "vocab_size": 51200,
               "mlp": "gelu"},
        train={"global_batch": batch, "seq_len": 2048, "dtype": "bf16", "attention": "eager", "dropout": True,
               "sequence_parallel": sequence_parallel, "overlap_grad_reduce": False},
        cluster={"gpu": "a100-80gb", "gpus": gpus, "gpus_per_node": 8},
        layout={"tp": tp, "pp": pp, "vpp": 1, "dp": gpus // (tp * pp), "cp": 1, "ep": 1, "micro_batch": 1,
                "zero": zero, "recompute": recompute},
        measured_s=seconds)


KORTHIKANTI = "Korthikanti et al. 2022 (arXiv 2205.05198), Table 5"
MT_NLG = "Smith et al. 2022, MT-NLG 530B (arXiv 2201.11990), Table 1; DeepSpeed pipeline, ZeRO-1"

# Published runs the constants were not fitted to. Korthikanti et al.: Megatron-LM with full
# recompute (no sequence parallelism) and with sequence parallelism + selective recompute, one
# global batch per pipeline; MT-NLG: Megatron-DeepSpeed, batch 1,920, at three cluster sizes.
PUBLISHED_RUNS: tuple[ValidationRun, ...] = tuple(
    run
    for name, layers, hidden, heads, tp, pp, gpus, batch, full_s, selective_s in (
        ("22B", 48, 6144, 64, 8, 1, 8, 4, 1.42, 1.10),
        ("175B", 96, 12288, 96, 8, 8, 64, 64, 18.13, 13.75),
        ("530B", 105, 20480, 128, 8, 35, 280, 280, 49.05, 37.83),
        ("1T", 128, 25600, 160, 8, 64, 512, 512, 94.42, 71.49),
    )
    for run in (
        _megatron(f"{name} full recompute", KORTHIKANTI, layers, hidden, heads, tp, pp, gpus, batch, "full",
                  full_s, False),
        _megatron(f"{name} selective recompute + SP", KORTHIKANTI, layers, hidden, heads, tp, pp, gpus, batch,
                  "selective", selective_s, True),
    )
) + tuple(
    _megatron(f"MT-NLG 530B on {nodes} nodes", MT_NLG, 105, 20480, 128, 8, 35, 8 * nodes, 1920, "full", seconds,
              False, zero=1)
    for nodes, seconds in ((280, 60.1), (350, 50.2), (420, 44.4))
)


def local_runs() -> tuple[ValidationRun, ...]:
    """plait's own steps on the dev machine (plait/plan/local_runs.py, written by
    bench/planner_local.py --save-validation)."""
    from plait.plan.local_runs import RUNS

    return tuple(ValidationRun(**run) for run in RUNS)


def rms(errors: list[float]) -> float:
    return math.sqrt(sum(e * e for e in errors) / len(errors)) if errors else 0.0


@functools.lru_cache(maxsize=2)
def validation_errors(cpu: bool) -> tuple[tuple[str, float], ...]:
    """(layout class, relative error) of every validation run on CPUs or on GPUs."""
    runs = local_runs() if cpu else PUBLISHED_RUNS
    return tuple((run.layout_class, run.error()) for run in runs)


def band_from(errors: list[tuple[str, float]], cls: str) -> tuple[float, int, str]:
    """(relative half-width, runs it rests on, their scope) for class ``cls`` from ``errors``."""
    own = [e for c, e in errors if c == cls]
    if len(own) >= MIN_CLASS_RUNS:
        return rms(own), len(own), cls
    return rms([e for _, e in errors]), len(errors), "all"


@dataclass(frozen=True)
class Uncertainty:
    layout_class: str
    relative: float  # half-width of the band, as a fraction of the prediction
    runs: int  # validation runs it rests on
    scope: str  # the class itself, or "all" when the class has too few runs

    def record(self, step_s: float) -> dict:
        return {"class": self.layout_class, "relative": round(self.relative, 4),
                "step_time_s": [round(step_s * (1 - self.relative), 6), round(step_s * (1 + self.relative), 6)],
                "validation_runs": self.runs, "from": self.scope}


def uncertainty(layout: Layout, cpu: bool) -> Uncertainty:
    """The band of a prediction for ``layout`` on a CPU profile or a GPU cluster."""
    cls = layout_class(layout)
    relative, runs, scope = band_from(list(validation_errors(cpu)), cls)
    return Uncertainty(cls, relative, runs, scope)


def leave_one_out(errors: list[tuple[str, float]]) -> list[tuple[float, float]]:
    """For each run, (its error, the band built from all the other runs): a band covers a run
    when abs(error) <= band."""
    out = []
    for i, (cls, error) in enumerate(errors):
        others = errors[:i] + errors[i + 1:]
        out.append((error, band_from(others, cls)[0]))
    return out
