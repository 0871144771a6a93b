"""What ``plait plan`` prints: a table of the best layouts with their breakdown, or JSON."""

from __future__ import annotations

import json

from plait.plan.estimate import Estimate
from plait.plan.hardware import GIB
from plait.plan.search import SearchResult
from plait.plan.validation import uncertainty


def layout_record(est: Estimate, placement=None, refused: str | None = None, cpu: bool = False) -> dict:
    """One entry of the JSON contract's ``layouts`` list; with a NIC-aware placement (mixed-NIC
    clusters) its step time is the placed one and ``placement`` tells stages, layers and gain.
    ``plait_train`` is "ok", or "refused: <reason>" for a layout fixed by --layout that plait
    train does not run. ``uncertainty`` is the band of the step time from the validation error
    of the layout's class (plait/plan/validation.py; ``cpu``: the CPU validation runs)."""
    lo = est.layout
    record = {
        "tp": lo.tp, "pp": lo.pp, "vpp": lo.vpp, "dp": lo.dp, "cp": lo.cp, "ep": lo.ep,
        "micro_batch": lo.micro_batch, "zero": lo.zero, "recompute": lo.recompute, "schedule": lo.schedule,
        "offload": lo.offload, "activation_offload": lo.activation_offload,
        "recompute_fraction": lo.recompute_fraction,
        "step_time_s": round(est.step_time_s, 6),
        "tokens_per_s_per_gpu": round(est.tokens_per_s_per_gpu, 3),
        "model_tflops_per_gpu": round(est.model_tflops_per_gpu, 3),
        "mfu": round(est.mfu, 4),
        "memory_gib_per_gpu": round(est.memory.total / GIB, 3),
        "host_memory_gib_per_gpu": round(est.memory.host.total / GIB, 3),
        "fits": est.fits,
        "breakdown": est.breakdown(),
        "plait_train": f"refused: {refused}" if refused else "ok",
    }
    if placement is not None:
        record["step_time_s"] = round(placement.step_time_s, 6)
        record["placement"] = placement.record()
    record["uncertainty"] = uncertainty(lo, cpu).record(record["step_time_s"])
    return record


def memory_options(lo) -> str:
    """The table's short form of a layout's [memory] options: 'opt' or 'params' (memory.offload),
    'aN' (memory.activation_offload = N), 'rF' (memory.recompute_fraction = F); '-' for none."""
    parts = [lo.offload] if lo.offload != "none" else []
    parts += [f"a{lo.activation_offload}"] if lo.activation_offload else []
    parts += [f"r{lo.recompute_fraction:g}"] if lo.recompute_fraction else []
    return "+".join(p.replace("optimizer", "opt") for p in parts) or "-"


def to_json(result: SearchResult, top: int, cpu: bool = False) -> str:
    shown = result.ranked[:top] or sorted(result.too_big, key=lambda e: e.memory.total)[:top]
    return json.dumps({"layouts": [layout_record(e, result.placements.get(e.layout), result.refused.get(e.layout), cpu)
                                   for e in shown], "why_others_lost": result.why_lost(len(shown)),
                       "searched": len(result.ranked) + result.too_big_count, "fitting": len(result.ranked)}, indent=1)


def to_table(result: SearchResult, top: int, gpu_memory_gib: float, cpu: bool = False) -> str:
    lines = []
    shown = result.ranked[:top]
    if not shown:
        closest = sorted(result.too_big, key=lambda e: e.memory.total)[:top]
        lines.append(f"No layout fits in {gpu_memory_gib:.0f} GiB per GPU; the closest:")
        shown = closest
    header = (f"{'#':>2} {'tp':>3} {'pp':>3} {'vpp':>3} {'dp':>5} {'cp':>3} {'ep':>3} {'mbs':>4} {'zero':>4} "
              f"{'recompute':<9} {'memory':<14} {'step s':>9} {'±':>4} {'tok/s/GPU':>10} {'TFLOP/s':>8} {'MFU':>6} {'GiB':>7}")
    lines.append(header)
    for i, est in enumerate(shown, 1):
        lo = est.layout
        placement = result.placements.get(lo)
        step = placement.step_time_s if placement else est.step_time_s
        lines.append(f"{i:>2} {lo.tp:>3} {lo.pp:>3} {lo.vpp:>3} {lo.dp:>5} {lo.cp:>3} {lo.ep:>3} {lo.micro_batch:>4} "
                     f"{lo.zero:>4} {lo.recompute:<9} {memory_options(lo):<14} {step:>9.4g} "
                     f"{100 * uncertainty(lo, cpu).relative:>3.0f}% {est.tokens_per_s_per_gpu:>10.1f} "
                     f"{est.model_tflops_per_gpu:>8.1f} {100 * est.mfu:>5.1f}% {est.memory.total / GIB:>7.2f}")
    lines.append("")
    for i, est in enumerate(shown, 1):
        comm = ", ".join(f"{k} {v:.3g}" for k, v in est.exposed_comm_s.items() if v > 0) or "none"
        mem = ", ".join(f"{k} {v:.2f}" for k, v in est.memory.gib().items())
        lines.append(f"#{i} {est.layout.schedule}: compute {est.compute_s:.4g} s, bubble {est.bubble_s:.3g} s, "
                     f"optimizer {est.optimizer_s:.3g} s, exposed communication (s): {comm}")
        lines.append(f"   memory GiB: {mem}")
        if est.memory.host.total:
            host = ", ".join(f"{k} {v:.2f}" for k, v in est.memory.host_gib().items())
            lines.append(f"   host memory GiB: {host}")
        if est.layout in result.refused:
            lines.append(f"   plait train refuses this layout: {result.refused[est.layout]}")
        placement = result.placements.get(est.layout)
        if placement is not None:
            stages = ", ".join(f"{k}@{link}" for k, link in zip(placement.stage_layers, placement.stage_links))
            lines.append(f"   NIC-aware placement: layers per stage {stages}; {placement.step_time_s:.4g} s vs "
                         f"{placement.oblivious_step_time_s:.4g} s NIC-oblivious ({100 * (placement.gain - 1):.1f}% faster)")
    if any(e.layout.memory_options for e in shown):
        lines.append("")
        lines.append("memory: opt | params = memory.offload, aN = memory.activation_offload = N, "
                     "rF = memory.recompute_fraction = F")
    lost = result.why_lost(len(shown))
    if lost:
        lines.append("")
        lines.append("Why others lost (best of each tp/pp/cp family):")
        lines.extend(f"  {line}" for line in lost)
    lines.append("")
    lines.append(f"{len(result.ranked)} layouts fit, {result.too_big_count} do not, {result.invalid} do not divide "
                 "the cluster or the model. Model FLOPs exclude recompute. ± is the RMS error of the planner on "
                 f"validation runs of the layout's class ({'plait on this CPU' if cpu else 'published GPU runs'}).")
    return "\n".join(lines)
