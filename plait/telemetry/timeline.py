"""Per-rank compute/idle timeline of a pipeline step, its bubble fraction, and a Gantt chart.

``PipelineTimeline.attach(stages)`` wraps, on each ``PipelineStage`` *instance*, the three
compute entry points every torch.distributed.pipelining schedule calls:

* ``forward_one_chunk``          -> "F" (forward of one micro-batch through one stage)
* ``backward_one_chunk``         -> "B" (full backward, or the input-gradient half "I" of the
                                        zero-bubble schedules; both are recorded as "B")
* ``backward_weight_one_chunk``  -> "W" (weight-gradient half of the zero-bubble schedules)

Each call records one interval ``(kind, stage_index, microbatch, start, end)`` in
``time.perf_counter()`` seconds. Everything else the schedule does on the rank (waiting for
p2p receives, launching sends, Python bookkeeping) is idle time. When the schedule is passed
to ``attach`` as well, the loss the schedule computes on the last stage right after that
stage's forward (``_maybe_compute_loss``) extends the F interval of the same micro-batch, so
F means "forward + loss" there; without it the loss counts as idle (it is tiny for a balanced
model, but plait's last stage computes a vocabulary-sized cross-entropy).

Cost: two ``perf_counter`` calls and one list append per compute call (about a microsecond
against milliseconds of compute), so it may stay attached; ``enabled = False`` turns the
recording off (the wrappers then only forward the call) and ``detach()`` removes them.

Measurement (``step_bubble``): the step window is from the first compute start to the last
compute end over all pipeline ranks; each rank's bubble is ``1 - busy / window`` (its idle
fraction of that window); the step's bubble is the mean over ranks. In 1F1B/GPipe every rank
idles (p-1) micro-batch slots of the window, which gives the textbook (p-1)/(m+p-1).
``step_end()`` alone (no communication) gives a rank-local estimate: ``step_s`` is the wall
time from ``step_begin()`` to ``step_end()`` and ``bubble = 1 - busy_s / step_s``; it also
counts the schedule's set-up and final send waits, so it reads slightly higher.
``replay(timelines)`` re-times a recorded step with free communication, which splits the
measured bubble into the schedule's own (``balanced=True``: equals ``theory_bubble``), uneven
compute speed, and communication/overhead.

Clocks: ``gather(align="clock")`` (default) compares ``perf_counter`` values across ranks.
On Linux that is CLOCK_MONOTONIC, shared by all processes of one machine, so ranks on one
node line up exactly. Ranks on different nodes do not share a clock: use
``gather(align="begin")``, which puts each rank's times relative to its own ``step_begin()``,
and call ``dist.barrier(group)`` just before ``step_begin()`` so those origins coincide to
within the barrier's exit skew (about one network latency). Attach one timeline per stage.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Iterable

import torch.distributed as dist

from plait.layout import SCHEDULES, idle_fraction

KINDS = ("F", "B", "W")
_WRAPPED = {"forward_one_chunk": "F", "backward_one_chunk": "B", "backward_weight_one_chunk": "W"}
_LOSS_HOOK = "_maybe_compute_loss"

# Schedules whose ranks hold one stage each.
_SINGLE = tuple(s.name for s in SCHEDULES.values() if not s.multi_stage)


def theory_bubble(schedule: str, p: int, m: int, v: int = 1) -> float:
    """Ideal idle fraction of a step for a balanced pipeline of ``p`` ranks, ``m`` micro-batches
    and ``v`` stages per rank (the quantity ``step_bubble`` measures).

    * gpipe, 1f1b: ``(p-1) / (m+p-1)``: each rank idles p-1 micro-batch slots (fill and drain)
      of the m+p-1 slots of the step.
    * interleaved_1f1b, looped_bfs: a slot is 1/v as long (a stage holds 1/v of the rank's
      layers), so the idle is (p-1)/v slots against m slots of work: ``(p-1) / (v*m + p-1)``.
      This is Megatron's bubble-over-compute ratio ``(p-1)/(v*m)`` expressed as a fraction of
      the step. The issue's "(p-1)/(m+p-1) divided by v" is the same idea to first order; it
      is smaller by a factor ``(v*m+p-1) / (v*(m+p-1))`` (1/10 instead of 1/9 at p=2, m=4, v=2)
      because it also shrinks the work term. ``theory_bubble_issue`` returns that literal form.
    * interleaved_zero_bubble, zbv, dualpipev: we use the interleaved value as an *upper
      bound*. These schedules split B into input- and weight-gradient halves and fill the
      bubble with W work; how much they fill depends on the B/W cost split and on m, so there
      is no single closed form (the ideal is 0).
    """
    if p < 1 or m < 1 or v < 1:
        raise ValueError(f"theory_bubble needs p, m, v >= 1 (got p={p}, m={m}, v={v})")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule '{schedule}'")
    if schedule in _SINGLE and v != 1:
        raise ValueError(f"schedule '{schedule}' runs one stage per rank (got v={v})")
    return idle_fraction(schedule, p, m, v)  # the schedules table's bubble, as a fraction


def theory_bubble_issue(schedule: str, p: int, m: int, v: int = 1) -> float:
    """The issue's literal formula: ``(p-1)/(m+p-1)``, divided by ``v`` for the multi-stage
    schedules (see ``theory_bubble`` for how it relates to the exact idle fraction)."""
    theory_bubble(schedule, p, m, v)  # validates
    return (p - 1) / (m + p - 1) / (1 if schedule in _SINGLE else v)


class PipelineTimeline:
    """Records this rank's compute intervals of each pipeline step.

    Usage on every pipeline rank::

        timeline = PipelineTimeline().attach(stages, schedule)
        timeline.step_begin()
        schedule.step(...)
        local = timeline.step_end()              # this rank: intervals, busy_s, step_s, bubble
        ranks = timeline.gather(pp_group)        # collective: every rank's timeline
        bubble = step_bubble(ranks)              # the step's measured bubble fraction
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.rank = 0
        self._intervals: list[tuple[str, int, int, float, float]] = []
        self._begin: float | None = None
        self._depth = 0  # only the outermost compute call is recorded
        self._patched: list[tuple[Any, str]] = []
        self.last: dict | None = None

    # ----------------------------------------------------------------------------- recording
    def attach(self, stages: Iterable, schedule: Any = None) -> "PipelineTimeline":
        """Wrap the compute entry points of each stage instance (and, with ``schedule``, its
        last-stage loss computation). Returns self."""
        stages = list(stages)
        if not stages:
            raise ValueError("PipelineTimeline.attach needs at least one stage")
        self.detach()
        self.rank = int(getattr(stages[0], "group_rank", dist.get_rank() if dist.is_initialized() else 0))
        for stage in stages:
            for name, kind in _WRAPPED.items():
                original = getattr(stage, name)
                setattr(stage, name, self._wrap(original, kind, stage))
                self._patched.append((stage, name))
        if schedule is not None and hasattr(schedule, _LOSS_HOOK):
            setattr(schedule, _LOSS_HOOK, self._wrap_loss(getattr(schedule, _LOSS_HOOK)))
            self._patched.append((schedule, _LOSS_HOOK))
        return self

    def detach(self) -> None:
        """Remove the wrappers (the instances fall back to their class methods)."""
        for obj, name in self._patched:
            obj.__dict__.pop(name, None)
        self._patched = []

    def _wrap(self, original, kind: str, stage):
        stage_index = int(stage.stage_index)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if not self.enabled or self._depth:
                return original(*args, **kwargs)
            chunk = args[0] if args else kwargs.get("fwd_chunk_id", kwargs.get("bwd_chunk_id", -1))
            self._depth += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self._depth -= 1
                self._intervals.append((kind, stage_index, int(chunk), start, end))

        return timed

    def _wrap_loss(self, original):
        @functools.wraps(original)
        def timed(stage, output, target_mbs, mb_index, *args, **kwargs):
            if not self.enabled:
                return original(stage, output, target_mbs, mb_index, *args, **kwargs)
            start = time.perf_counter()
            out = original(stage, output, target_mbs, mb_index, *args, **kwargs)
            end = time.perf_counter()
            if not getattr(stage, "is_last", False):
                return out  # no loss computed on this stage
            key = ("F", int(stage.stage_index), int(mb_index))
            if self._intervals and self._intervals[-1][:3] == key:
                kind, s, mb, fwd_start, _ = self._intervals[-1]
                self._intervals[-1] = (kind, s, mb, fwd_start, end)
            else:
                self._intervals.append((*key, start, end))
            return out

        return timed

    def step_begin(self) -> None:
        """Start a step: drop the previous step's intervals."""
        self._intervals = []
        self._begin = time.perf_counter()

    def step_end(self) -> dict:
        """This rank's timeline of the step since ``step_begin()``.

        Keys: ``rank`` (pp-group rank), ``intervals`` (list of (kind, stage, microbatch, start,
        end), perf_counter seconds, in call order), ``begin``/``end`` (step_begin/step_end
        times), ``busy_s`` (sum of interval lengths), ``step_s`` (end - begin), ``bubble``
        (1 - busy_s/step_s: this rank's idle fraction of its own wall time).
        """
        end = time.perf_counter()
        begin = self._begin if self._begin is not None else (self._intervals[0][3] if self._intervals else end)
        busy = sum(e - s for _, _, _, s, e in self._intervals)
        step = max(end - begin, 1e-12)
        self.last = {
            "rank": self.rank, "intervals": list(self._intervals), "begin": begin, "end": end,
            "busy_s": busy, "step_s": step, "bubble": max(0.0, 1.0 - busy / step),
        }
        self._begin = None
        return self.last

    # -------------------------------------------------------------------------------- ranks
    def gather(self, group=None, dst: int | None = None, align: str = "clock") -> list[dict] | None:
        """Collective over ``group`` (the pp group; all of its ranks must call it): every rank's
        last ``step_end()`` timeline, ordered by pp rank, with times shifted to a common origin.

        ``align="clock"``: origin = the earliest compute start over ranks (same-machine clocks,
        see the module docstring). ``align="begin"``: each rank's times relative to its own
        ``step_begin()`` (multi-node; barrier before step_begin). ``dst`` = a group rank:
        only that rank gets the list (the others get None); default: every rank gets it.
        """
        if align not in ("clock", "begin"):
            raise ValueError(f"align must be 'clock' or 'begin' (got {align!r})")
        local = self.last if self.last is not None else self.step_end()
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            world = dist.get_world_size(group)
            if dst is None:
                everyone: list = [None] * world
                dist.all_gather_object(everyone, local, group=group)
            else:
                everyone = [None] * world if dist.get_rank(group) == dst else None
                dist.gather_object(local, everyone, group=group, group_dst=dst)
                if everyone is None:
                    return None
        else:
            everyone = [local]
        return align_timelines(everyone, align)


def align_timelines(timelines: list[dict], align: str = "clock") -> list[dict]:
    """Copies of ``timelines`` sorted by rank, times shifted to a common origin (see gather)."""
    out = []
    if align == "clock":
        starts = [iv[3] for t in timelines for iv in t["intervals"]]
        origin = min(starts) if starts else min(t["begin"] for t in timelines)
    for t in sorted(timelines, key=lambda t: t["rank"]):
        zero = origin if align == "clock" else t["begin"]
        shifted = dict(t)
        shifted["intervals"] = [(k, s, mb, a - zero, b - zero) for k, s, mb, a, b in t["intervals"]]
        shifted["begin"], shifted["end"] = t["begin"] - zero, t["end"] - zero
        out.append(shifted)
    return out


def step_window(timelines: list[dict]) -> tuple[float, float]:
    """(first compute start, last compute end) over all ranks."""
    starts = [iv[3] for t in timelines for iv in t["intervals"]]
    ends = [iv[4] for t in timelines for iv in t["intervals"]]
    if not starts:
        return 0.0, 0.0
    return min(starts), max(ends)


def rank_bubbles(timelines: list[dict]) -> list[float]:
    """Each rank's idle fraction of the common step window (see ``step_bubble``)."""
    first, last = step_window(timelines)
    window = last - first
    if window <= 0:
        return [0.0 for _ in timelines]
    return [max(0.0, 1.0 - sum(e - s for _, _, _, s, e in t["intervals"]) / window) for t in timelines]


def step_bubble(timelines: list[dict]) -> float:
    """The step's bubble fraction: mean over ranks of idle / window, the window being from the
    first compute start to the last compute end over all ranks. Needs a common time origin
    (the output of ``gather`` / ``align_timelines``)."""
    bubbles = rank_bubbles(timelines)
    return sum(bubbles) / len(bubbles) if bubbles else 0.0


def replay(timelines: list[dict], balanced: bool = False) -> list[dict]:
    """The recorded step re-timed with zero communication and scheduling overhead.

    Every rank runs its recorded compute calls in the recorded order; each starts as soon as
    its rank is free and its inputs exist: F(s, mb) after F(s-1, mb); B(s, mb) after
    B(s+1, mb) (after F(s, mb) on the last stage); W(s, mb) after B(s, mb). Durations are the
    measured ones, or with ``balanced`` the mean duration of each kind over all ranks and
    stages (a perfectly balanced pipeline with the same F/B/W costs).

    ``step_bubble(replay(t))`` is the bubble the schedule would have with these compute times
    and free communication; ``step_bubble(t) - step_bubble(replay(t))`` is what communication
    and overhead added; ``step_bubble(replay(t, balanced=True))`` is the schedule's own bubble
    for a balanced model (equal to ``theory_bubble`` for gpipe/1f1b/interleaved_1f1b, and the
    figure to compare with for the zero-bubble schedules).
    """
    ranks = sorted(timelines, key=lambda t: t["rank"])
    mean = {}
    for kind in {iv[0] for t in ranks for iv in t["intervals"]}:
        lengths = [e - s for t in ranks for k, _, _, s, e in t["intervals"] if k == kind]
        mean[kind] = sum(lengths) / len(lengths)
    last_stage = max((iv[1] for t in ranks for iv in t["intervals"]), default=0)
    present = {iv[:3] for t in ranks for iv in t["intervals"]}
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * len(ranks)
    cursor = [0] * len(ranks)
    out = [[] for _ in ranks]
    remaining = sum(len(t["intervals"]) for t in ranks)
    while remaining:
        progressed = False
        for r, t in enumerate(ranks):
            while cursor[r] < len(t["intervals"]):
                kind, stage, mb, start, end = t["intervals"][cursor[r]]
                if kind == "F":
                    deps = [("F", stage - 1, mb)] if stage > 0 else []
                elif kind == "B":
                    deps = [("F", stage, mb)] + ([("B", stage + 1, mb)] if stage < last_stage else [])
                else:
                    deps = [("B", stage, mb)]
                deps = [d for d in deps if d in present]
                if any(d not in done for d in deps):
                    break
                begin = max([free[r], *(done[d] for d in deps)])
                finish = begin + (mean[kind] if balanced else end - start)
                done[(kind, stage, mb)] = finish
                out[r].append((kind, stage, mb, begin, finish))
                free[r] = finish
                cursor[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ValueError("replay: the recorded order has a dependency cycle (incomplete timelines?)")
    replayed = []
    for t, intervals in zip(ranks, out):
        busy = sum(e - s for *_, s, e in intervals)
        end = max((e for *_, e in intervals), default=0.0)
        replayed.append({"rank": t["rank"], "intervals": intervals, "begin": 0.0, "end": end,
                         "busy_s": busy, "step_s": end, "bubble": 1.0 - busy / end if end > 0 else 0.0})
    return replayed


COLOURS = {"F": "#4C72B0", "B": "#DD8452", "W": "#55A868", "idle": "#E6E6E6"}


def plot_gantt(timelines: list[dict], path: str, title: str = "pipeline step") -> None:
    """Write a PNG Gantt chart: one row per pipeline rank, F/B/W boxes coloured (darker shade
    for a rank's later virtual stages), idle in grey, micro-batch numbers in boxes wide
    enough. ``timelines``: the output of ``gather`` (times from a common origin)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.colors as mcolors
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as exc:  # an optional dependency (pip install 'plait[plot]')
        raise ImportError("plot_gantt needs matplotlib: pip install matplotlib") from exc

    timelines = sorted(timelines, key=lambda t: t["rank"])
    first, last = step_window(timelines)
    scale, unit = (1e3, "ms") if last - first < 10 else (1.0, "s")
    width = max((last - first) * scale, 1e-9)
    n = len(timelines)
    fig, ax = plt.subplots(figsize=(11, 0.7 * n + 1.6))
    bubbles = rank_bubbles(timelines)
    for row, t in enumerate(timelines):
        y = n - 1 - row  # rank 0 at the top
        ax.barh(y, width, left=0.0, height=0.8, color=COLOURS["idle"], edgecolor="none")
        stages = sorted({iv[1] for iv in t["intervals"]})
        for kind, stage, mb, start, end in t["intervals"]:
            left, w = (start - first) * scale, (end - start) * scale
            shade = stages.index(stage) / max(1, len(stages))
            colour = _darken(mcolors, COLOURS.get(kind, "#999999"), 0.45 * shade)
            ax.barh(y, w, left=left, height=0.8, color=colour, edgecolor="white", linewidth=0.5)
            label = str(mb)
            if w >= 0.011 * width * (len(label) + 0.5):  # wide enough for the number
                ax.text(left + w / 2, y, label, ha="center", va="center", fontsize=7, color="white")
        ax.text(width * 1.005, y, f"{100 * bubbles[row]:.1f}% idle", va="center", fontsize=8)
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"rank {t['rank']}" for t in reversed(timelines)])
    ax.set_xlim(0, width * 1.1)
    looped = any(len({iv[1] for iv in t["intervals"]}) > 1 for t in timelines)
    ax.set_xlabel(f"time since first compute ({unit}); numbers: micro-batch"
                  + ("; darker: the rank's later stage" if looped else ""))
    mean = sum(bubbles) / n if n else 0.0
    ax.set_title(f"{title}  (bubble {100 * mean:.1f}%)")
    legend = [Patch(color=COLOURS[k], label=label) for k, label in
              (("F", "forward"), ("B", "backward"), ("W", "weight grad"), ("idle", "idle"))]
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.35 if n < 3 else -0.18),
              ncol=4, frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _darken(mcolors, colour: str, amount: float):
    r, g, b = mcolors.to_rgb(colour)
    return (r * (1 - amount), g * (1 - amount), b * (1 - amount))
