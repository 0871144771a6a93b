"""Layout rules, one home for the trainer's config checks and the planner's search.

- ``SCHEDULES``: every pipeline schedule plait runs (torch class, stages per rank, micro-batch
  rule, bubble, micro-batches in flight); everything that lists schedules reads this table.
- ``Degrees`` and ``Workload``: a layout's degrees and what the rules need of the model and
  batch. ``check_layout`` (and its parts, which ``plait.config`` calls in its own order) raises
  ConfigError naming the first problem; ``layout_problem`` returns it as text.
- ``Layout``: one candidate of the planner, and the ``--layout "tp=8,pp=2,..."`` text that fixes
  some of its fields.

Ranks are ordered like plait's DeviceMesh: tp innermost (neighbouring ranks, one node), then cp,
then dp (expert parallelism lives inside dp), and pp outermost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from plait.errors import ConfigError


# pipeline schedules ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """One pipeline schedule.

    ``forward_s``/``backward_s`` of ``bubble`` are one micro-batch through all of a rank's layers
    (backward includes recompute); the weight-gradient half of backward is what zero-bubble
    schedules move into the bubble (backward / 2 with equal input- and weight-gradient GEMMs).
    ``in_flight`` is the micro-batches whose activations the first stage holds at its peak, in
    units of one micro-batch through all of the rank's layers.
    """

    name: str
    torch_class: str  # class name in torch.distributed.pipelining.schedules
    stages_per_rank: str  # "one" | "any" (looped, pp_virtual_stages) | "two" (V-shaped, exactly 2)
    zero_bubble: bool  # splits backward into input- and weight-gradient halves
    micro_batches: str  # "any" | "at_least_pp" | "at_least_2pp" | "multiple_of_pp"
    bubble: Callable[[int, int, float, float], float]  # (pp, vpp, forward_s, backward_s) -> seconds
    in_flight: Callable[[int, int, int], float]  # (pp, vpp, micro-batches) -> micro-batches held
    # The schedule whose bubble this one has before weight gradients fill it (itself when it
    # moves none): the timeline's ideal idle fraction, an upper bound for zero-bubble schedules.
    unfilled: str = ""

    @property
    def multi_stage(self) -> bool:
        return self.stages_per_rank != "one"

    @property
    def v_shaped(self) -> bool:
        """Rank r holds stages r and 2pp-1-r, so the first and last stage share a rank."""
        return self.stages_per_rank == "two"

    def micro_batch_problem(self, pp: int, micro: int) -> str | None:
        """What the schedule needs of the micro-batches per step, or None when ``micro`` is enough."""
        if self.micro_batches == "at_least_pp" and micro < pp:
            return f"at least parallel.pp = {pp}"
        if self.micro_batches == "at_least_2pp" and micro < 2 * pp:
            return f"at least 2 x parallel.pp = {2 * pp}"
        if self.micro_batches == "multiple_of_pp" and micro % pp:
            return f"a multiple of parallel.pp = {pp}"
        return None


SCHEDULES: dict[str, Schedule] = {s.name: s for s in (
    # fill and drain of p stages, (p-1)(F+B); every micro-batch held (all forwards first)
    Schedule("gpipe", "ScheduleGPipe", "one", False, "any",
             lambda p, v, f, b: (p - 1) * (f + b), lambda p, v, m: m),
    # (p-1)(F+B); p held
    Schedule("1f1b", "Schedule1F1B", "one", False, "at_least_pp",
             lambda p, v, f, b: (p - 1) * (f + b), lambda p, v, m: p),
    # each fill step is a v-th of the rank's layers, (p-1)(F+B)/v; p(1 + (p-1)/(p·v)) held (Korthikanti et al.)
    Schedule("interleaved_1f1b", "ScheduleInterleaved1F1B", "any", False, "multiple_of_pp",
             lambda p, v, f, b: (p - 1) * (f + b) / v, lambda p, v, m: p + (p - 1) / v),
    # (p-1)(F+B)/v; every micro-batch held
    Schedule("looped_bfs", "ScheduleLoopedBFS", "any", False, "any",
             lambda p, v, f, b: (p - 1) * (f + b) / v, lambda p, v, m: m),
    # ZB-H1 interleaved: (p-1)F/v, weight gradients fill the rest; interleaved 1F1B's peak
    Schedule("interleaved_zero_bubble", "ScheduleInterleavedZeroBubble", "any", True, "multiple_of_pp",
             lambda p, v, f, b: (p - 1) * f / v, lambda p, v, m: p + (p - 1) / v, "interleaved_1f1b"),
    # ZB-V on two V-placed chunks, (p-1)F/2; the V placement keeps 1F1B's peak
    Schedule("zbv", "ScheduleZBVZeroBubble", "two", True, "at_least_pp",
             lambda p, v, f, b: (p - 1) * f / 2, lambda p, v, m: p, "interleaved_1f1b"),
    # DualPipe's (p/2-1)(F&B + B - 3W), F&B = F+B overlapped: (p/2-1)(F + 2B - 1.5B); p + 1 held
    # (the two directions each hold half of the chunks)
    Schedule("dualpipev", "ScheduleDualPipeV", "two", True, "at_least_2pp",
             lambda p, v, f, b: max(0.0, p / 2 - 1) * (f + 0.5 * b), lambda p, v, m: p + 1, "interleaved_1f1b"),
)}
PP_SCHEDULES = tuple(SCHEDULES)
PP_MULTI_STAGE = tuple(s.name for s in SCHEDULES.values() if s.multi_stage)
PP_V_SHAPED = tuple(s.name for s in SCHEDULES.values() if s.v_shaped)


def schedule(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}")
    return SCHEDULES[name]


def idle_fraction(name: str, pp: int, micro_batches: int, vpp: int = 1) -> float:
    """Ideal idle fraction of a balanced step before any weight-gradient filling: the schedule's
    (unfilled) bubble in micro-batch slots (F + B = 1) over the step's m slots plus that bubble.
    1F1B: (p-1)/(m+p-1); interleaved: (p-1)/(v·m+p-1); zero-bubble schedules: their interleaved
    bound (what they fill depends on the B/W cost split, so that is an upper bound)."""
    sched = schedule(name)
    idle = SCHEDULES[sched.unfilled or name].bubble(pp, vpp, 1.0, 0.0) if pp > 1 else 0.0
    return idle / (micro_batches + idle)


def resolve_schedule(requested: str, pp: int, vpp: int) -> str:
    """The schedule a layout runs: ``auto`` is 1F1B, or interleaved 1F1B with several stages per rank."""
    if requested != "auto":
        return requested
    return "interleaved_1f1b" if vpp > 1 else "1f1b"


def bubble_seconds(name: str, pp: int, vpp: int, forward_s: float, backward_s: float) -> float:
    """Idle time per step on the critical path, seconds (see ``SCHEDULES`` for each formula)."""
    sched = schedule(name)
    return 0.0 if pp == 1 else float(sched.bubble(pp, vpp, forward_s, backward_s))


def micro_batches_in_flight(name: str, pp: int, vpp: int, micro_batches: int) -> float:
    """Micro-batches whose activations the first stage holds at its peak (see ``Schedule``)."""
    sched = schedule(name)
    return 1.0 if pp == 1 else float(min(sched.in_flight(pp, vpp, micro_batches), micro_batches))


# layout rules -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Degrees:
    """A layout's degrees as the trainer's ``parallel`` section names them."""

    world: int
    tp: int = 1
    pp: int = 1
    vpp: int = 1  # parallel.pp_virtual_stages
    cp: int = 1
    ep: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1  # -1 fills the world
    zero: int = 3
    schedule: str = "1f1b"
    pp_split: str = ""
    cp_mode: str = "ring"  # auto | ring | ulysses | hybrid (softmax layers) | lasp2 (GLA alone)
    cp_ulysses: int = 2
    cp_shard: str = "zigzag"  # zigzag | contiguous
    workers: bool = False  # lowbw: dp_replicate groups are DiLoCo workers exchanging no gradients


@dataclass(frozen=True)
class Workload:
    """What the layout rules need of the model and the batch."""

    n_layers: int
    n_heads: int
    n_kv_heads: int  # 0 means n_heads
    ffn_dim: int
    seq_len: int
    global_batch: int
    micro_batch: int
    moe_experts: int = 0
    tie_embeddings: bool = False
    activation_checkpointing: str = "none"
    moe_balance_scope: str = "global_batch"
    profile_pipeline: bool = False
    gla_layers: int = 0  # blocks whose token mixer is gated linear attention
    gla_gate_rank: int = 16

    @property
    def softmax_layers(self) -> int:
        return self.n_layers - self.gla_layers

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


def resolve_dp(d: Degrees) -> int:
    """The data-parallel degree for ``d.world`` ranks (world / (tp x pp x cp)); raises ConfigError
    if the layout does not fill the world exactly."""
    if d.dp_shard == 0:
        raise ConfigError("parallel.dp_shard = 0 is out of range; use -1 (fill) or >= 1")
    model_parallel = d.tp * d.pp * d.cp
    if d.world % model_parallel:
        raise ConfigError(
            f"world size {d.world} is not divisible by parallel.tp x pp x cp = {d.tp} x {d.pp} x {d.cp}"
        )
    dp_world = d.world // model_parallel
    if d.dp_shard == -1:
        if dp_world % d.dp_replicate:
            raise ConfigError(
                f"world size {d.world} / (tp x pp x cp = {model_parallel}) = {dp_world} is not divisible by "
                f"parallel.dp_replicate = {d.dp_replicate}"
            )
        return dp_world
    if d.dp_replicate * d.dp_shard * model_parallel != d.world:
        raise ConfigError(
            f"layout parallel.dp_replicate x dp_shard x tp x pp x cp = {d.dp_replicate} x {d.dp_shard} x "
            f"{d.tp} x {d.pp} x {d.cp} = {d.dp_replicate * d.dp_shard * model_parallel} does not match the "
            f"world size {d.world}"
        )
    return dp_world


def shard_degree(d: Degrees, dp: int) -> int:
    """dp_shard with -1 resolved against the data-parallel degree ``dp``."""
    return dp // d.dp_replicate if d.dp_shard == -1 else d.dp_shard


def cp_degrees(d: Degrees) -> tuple[int, int]:
    """(ring degree, Ulysses degree) of the context-parallel layout; their product is cp."""
    if d.cp_mode == "ulysses":
        return 1, d.cp
    if d.cp_mode == "hybrid":
        return d.cp // d.cp_ulysses, d.cp_ulysses
    return d.cp, 1


def pp_stage_layers(d: Degrees, n_layers: int) -> list[int] | None:
    """Layers per pipeline stage from ``parallel.pp_split``, or None when it is empty (balance)."""
    text = d.pp_split.strip()
    if not text:
        return None
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"parallel.pp_split = {text!r} is not a comma-separated list of integers") from None
    stages = d.pp * d.vpp
    if len(counts) != stages or min(counts) < 1 or sum(counts) != n_layers:
        raise ConfigError(
            f"parallel.pp_split = {text!r} must list {stages} stage sizes (pp x pp_virtual_stages), "
            f"each >= 1, summing to model.n_layers = {n_layers}"
        )
    return counts


def check_model_parallel(d: Degrees, w: Workload, dp: int) -> None:
    """Tensor and pipeline parallel checks: heads split over tp, layers over the stages."""
    if w.n_heads % d.tp or w.kv_heads % d.tp:
        raise ConfigError(
            f"parallel.tp = {d.tp} must divide model.n_heads = {w.n_heads} and the KV heads ({w.kv_heads})"
        )
    if d.tp > 1 and (w.ffn_dim % d.tp or w.seq_len % d.tp):
        raise ConfigError(
            f"parallel.tp = {d.tp} must divide model.ffn_dim = {w.ffn_dim} and train.seq_len = {w.seq_len} "
            "(sequence parallel splits the sequence)"
        )
    shard = shard_degree(d, dp)
    # Context-parallel ranks hold the same weights, so they join the data-parallel reduction.
    replicated = shard * d.cp == 1 or d.zero < 2
    # lowbw workers (dp_replicate groups) exchange no gradients: only dp_shard x cp counts then.
    synced = (shard if d.workers else dp) * d.cp
    if d.tp > 1 and synced > 1 and replicated:
        raise ConfigError(
            f"parallel.tp = {d.tp} with replicated data parallelism (parallel.zero = {d.zero}, dp_shard = "
            f"{d.dp_shard}) is not supported; use parallel.zero = 2 or 3 with dp_shard > 1"
        )
    if w.gla_layers and w.gla_gate_rank % d.tp:
        raise ConfigError(f"parallel.tp = {d.tp} must divide model.gla_gate_rank = {w.gla_gate_rank} (GLA gates are "
                          "split over tp)")
    check_context_parallel(d, w)
    check_experts(d, w, shard)
    if (d.tp > 1 or d.pp > 1) and w.tie_embeddings:
        raise ConfigError("model.tie_embeddings = true is not supported with parallel.tp > 1 or parallel.pp > 1")
    check_pipeline(d, w, dp)


def check_pipeline(d: Degrees, w: Workload, dp: int) -> None:
    """Stages per rank fit the schedule, stages fit the layers, micro-batches fit the schedule."""
    sched, v = schedule(d.schedule), d.vpp
    if sched.v_shaped and d.pp > 1 and v != 2:
        raise ConfigError(f"parallel.pp_schedule = '{d.schedule}' needs parallel.pp_virtual_stages = 2 (got {v})")
    if not sched.multi_stage and v != 1:
        raise ConfigError(
            f"parallel.pp_schedule = '{d.schedule}' runs one stage per rank; parallel.pp_virtual_stages "
            f"must be 1 (got {v}); use one of {', '.join(PP_MULTI_STAGE)} for several"
        )
    if d.pp == 1:
        if w.profile_pipeline:
            raise ConfigError("--profile-pipeline (metrics.profile_pipeline) needs parallel.pp > 1")
        return
    stages = d.pp * v
    if stages > w.n_layers:
        raise ConfigError(
            f"parallel.pp x parallel.pp_virtual_stages = {stages} stages is more than model.n_layers = {w.n_layers}"
        )
    pp_stage_layers(d, w.n_layers)
    micro = w.global_batch // (w.micro_batch * dp)
    problem = sched.micro_batch_problem(d.pp, micro)
    if problem is not None:
        raise ConfigError(
            f"parallel.pp_schedule = '{d.schedule}' needs {problem} micro-batches per step; "
            f"train.global_batch / (train.micro_batch x dp) = {w.global_batch} / ({w.micro_batch} x {dp}) = {micro}"
        )


def check_experts(d: Degrees, w: Workload, dp_shard: int) -> None:
    """Mixture-of-experts fields fit together and with the layout."""
    if not w.moe_experts:
        if d.ep > 1:
            raise ConfigError(f"parallel.ep = {d.ep} needs a mixture-of-experts model (model.moe_experts > 0)")
        return
    if d.cp > 1:
        raise ConfigError("mixture-of-experts models (model.moe_experts > 0) do not support parallel.cp > 1 yet")
    if w.moe_balance_scope == "global_batch" and w.activation_checkpointing != "none":
        raise ConfigError(
            "moe.balance_scope = 'global_batch' with train.activation_checkpointing = "
            f"'{w.activation_checkpointing}' would count recomputed tokens twice; use 'none' or "
            "moe.balance_scope = 'micro_batch'"
        )
    if d.ep == 1:
        return
    if w.moe_experts % d.ep:
        raise ConfigError(f"model.moe_experts = {w.moe_experts} is not divisible by parallel.ep = {d.ep}")
    if dp_shard % d.ep or d.zero < 2:
        raise ConfigError(
            f"parallel.ep = {d.ep} must divide the sharded data-parallel degree (dp_shard = {dp_shard}) with "
            f"parallel.zero = 2 or 3 (got {d.zero}): expert ranks are FSDP ranks"
        )


def check_context_parallel(d: Degrees, w: Workload) -> None:
    """The sequence splits into the cp layout's chunks, and Ulysses can split the heads."""
    if d.cp == 1:
        return
    if d.cp_mode == "lasp2" and w.softmax_layers:
        raise ConfigError(
            "parallel.cp_mode = 'lasp2' is for GLA layers, and this model has softmax layers (model.attention, "
            "model.layer_pattern); they need 'auto', 'ring', 'ulysses' or 'hybrid' (GLA layers use LASP-2 in every mode)"
        )
    if not w.softmax_layers and d.cp_mode not in ("auto", "lasp2"):
        raise ConfigError(
            f"parallel.cp_mode = '{d.cp_mode}' is for softmax attention, and every layer of this model is GLA; "
            "use 'lasp2' (or 'auto')"
        )
    if d.cp_mode == "hybrid" and (d.cp % d.cp_ulysses or not 1 < d.cp_ulysses < d.cp):
        raise ConfigError(
            f"parallel.cp_mode = 'hybrid' needs parallel.cp_ulysses strictly between 1 and parallel.cp = {d.cp} "
            f"and dividing it (got {d.cp_ulysses}); use cp_mode = 'ring' or 'ulysses' for a single kind"
        )
    chunks = 2 * d.cp if d.cp_shard == "zigzag" else d.cp
    if w.seq_len % (chunks * d.tp):
        raise ConfigError(
            f"train.seq_len = {w.seq_len} must be a multiple of {chunks * d.tp}: parallel.cp_shard = "
            f"'{d.cp_shard}' cuts it into {chunks} chunks for parallel.cp = {d.cp}"
            + (f", and sequence parallel splits each rank's part over parallel.tp = {d.tp}" if d.tp > 1 else "")
        )
    _, ulysses = cp_degrees(d)
    if ulysses == 1 or not w.softmax_layers:
        return
    heads, kv_heads = w.n_heads // d.tp, w.kv_heads // d.tp
    if heads % ulysses or (kv_heads % ulysses and ulysses % kv_heads):
        raise ConfigError(
            f"Ulysses degree {ulysses} (parallel.cp_mode = '{d.cp_mode}') must divide the attention heads per "
            f"tensor-parallel rank ({heads}), and divide or be a multiple of the KV heads per rank ({kv_heads})"
        )


def check_batch(w: Workload, dp: int) -> None:
    if w.global_batch % (w.micro_batch * dp):
        raise ConfigError(
            f"train.global_batch = {w.global_batch} must be a multiple of train.micro_batch "
            f"({w.micro_batch}) x data-parallel degree ({dp})"
        )


def check_layout(d: Degrees, w: Workload) -> int:
    """Every layout rule, in the trainer's order; returns the data-parallel degree, raises
    ConfigError naming the first problem."""
    dp = resolve_dp(d)
    check_model_parallel(d, w, dp)
    check_batch(w, dp)
    return dp


def layout_problem(d: Degrees, w: Workload) -> str | None:
    """Why the trainer refuses this layout, or None when it accepts it."""
    try:
        check_layout(d, w)
    except ConfigError as e:
        return str(e)
    return None


# the planner's candidates -----------------------------------------------------------------------

RECOMPUTE = ("none", "selective", "op", "full")
OFFLOAD = ("none", "optimizer", "params")  # memory.offload
INT_FIELDS = ("tp", "pp", "vpp", "dp", "cp", "ep", "mbs", "zero")
MEMORY_KEYS = ("offload", "activation_offload", "recompute_fraction")  # the [memory] section's names
LAYOUT_KEYS = INT_FIELDS + ("recompute", "schedule") + MEMORY_KEYS


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    vpp: int
    dp: int
    cp: int
    ep: int
    micro_batch: int
    zero: int
    recompute: str  # none | selective (attention core) | op (all but matmuls and attention) | full (whole block)
    schedule: str  # a name in SCHEDULES; "1f1b" when pp = 1
    # The [memory] section: model state on the host (none | optimizer | params), the first N
    # blocks' saved activations on the host (-1 all), the share of tokens recomputed per block.
    offload: str = "none"
    activation_offload: int = 0
    recompute_fraction: float = 0.0

    @property
    def memory_options(self) -> bool:
        """Whether the layout uses any of the [memory] section's options."""
        return self.offload != "none" or self.activation_offload != 0 or self.recompute_fraction > 0

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    def micro_batches(self, global_batch: int) -> int:
        """Micro-batches per pipeline per step."""
        return global_batch // (self.dp * self.micro_batch)

    def degrees(self, cp_mode: str = "ring") -> Degrees:
        """The trainer's degrees for this candidate: dp is all sharded (dp_shard = dp), cp zigzag."""
        return Degrees(world=self.gpus, tp=self.tp, pp=self.pp, vpp=self.vpp, cp=self.cp, ep=self.ep,
                       dp_replicate=1, dp_shard=self.dp, zero=self.zero, schedule=self.schedule,
                       cp_mode=cp_mode, cp_shard="zigzag")

    def text(self) -> str:
        return (f"tp={self.tp},pp={self.pp},vpp={self.vpp},dp={self.dp},cp={self.cp},ep={self.ep},"
                f"mbs={self.micro_batch},zero={self.zero},recompute={self.recompute}" + self.memory_text())

    def memory_text(self) -> str:
        """The memory options that differ from the defaults, as ``--layout`` takes them."""
        parts = [f"offload={self.offload}"] if self.offload != "none" else []
        if self.activation_offload:
            parts.append(f"activation_offload={self.activation_offload}")
        if self.recompute_fraction:
            parts.append(f"recompute_fraction={self.recompute_fraction:g}")
        return "".join("," + p for p in parts)


def parse_layout(text: str) -> dict[str, int | str]:
    """``"tp=8,pp=2,recompute=full"`` -> {"tp": 8, "pp": 2, "recompute": "full"}; the fields left
    out are searched. Raises ConfigError on an unknown key or a bad value."""
    fixed: dict[str, int | str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.strip().partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in LAYOUT_KEYS:
            raise ConfigError(f"--layout {text!r}: '{part.strip()}' is not KEY=VALUE with KEY one of {', '.join(LAYOUT_KEYS)}")
        if key == "recompute":
            if value not in RECOMPUTE:
                raise ConfigError(f"--layout recompute={value!r}; choose one of {', '.join(RECOMPUTE)}")
            fixed[key] = value
        elif key == "schedule":
            if value not in PP_SCHEDULES:
                raise ConfigError(f"--layout schedule={value!r}; choose one of {', '.join(PP_SCHEDULES)}")
            fixed[key] = value
        elif key in MEMORY_KEYS:
            fixed[key] = _memory_value(key, value)
        else:
            if not value.isdigit() or int(value) < (0 if key == "zero" else 1):
                raise ConfigError(f"--layout {key}={value!r} must be an integer >= {0 if key == 'zero' else 1}")
            if key == "zero" and int(value) > 3:
                raise ConfigError(f"--layout zero={value} is out of range; ZeRO stages are 0 to 3")
            fixed[key] = int(value)
    return fixed


def _memory_value(key: str, value: str) -> int | float | str:
    """A [memory] option of ``--layout``, checked like the config checks it."""
    if key == "offload":
        if value not in OFFLOAD:
            raise ConfigError(f"--layout offload={value!r}; choose one of {', '.join(OFFLOAD)}")
        return value
    if key == "activation_offload":
        if not value.lstrip("-").isdigit() or int(value) < -1:
            raise ConfigError(f"--layout activation_offload={value!r} must be an integer >= -1 (-1: every block)")
        return int(value)
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not 0 <= fraction <= 1:
        raise ConfigError(f"--layout recompute_fraction={value!r} must be a number from 0 to 1")
    return fraction
