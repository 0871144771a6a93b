"""Metrics on rank 0: metrics.jsonl, TensorBoard, a progress display, a loss-curve PNG.

metrics.jsonl holds one JSON object per logged step with ``step``, ``loss``, ``lr``,
``grad_norm``, ``tokens`` (cumulative), ``tokens_per_s``, ``mfu`` (fraction of the configured
peak), ``mem_gib``, ``step_s``, rank 0's traffic (``comm_bytes`` and ``comm_dim_s``: wire bytes
and seconds per mesh dim; ``comm_s`` in all), and the data's ``imbalance`` and ``padding``
(``StepStats`` in plait/data/loader.py); steps that ran validation add ``val_loss`` and
``val_ppl``. Pipeline runs add ``bubble``, low-bandwidth runs ``sync_bytes``/``sync_wait_s``,
MoE runs the ``moe_*`` keys.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import time
from typing import Any

import torch

from plait.config import JobConfig
from plait.models.flops import flops_per_token  # the MFU's count (bench/gpu.py imports it from here)
from plait.checkpoint.atomic import atomic_write
from plait.telemetry import collectives as comm
from plait.train.trackers import log_to, open_trackers, scalars

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PIPELINE_FILE = "pipeline.json"  # the latest step's pipeline timeline, for the live page
TIMELINE_EVERY_S = 1.0


class StepClock:
    """A step's wall time, split into compute and waiting: blocked in counted collectives
    (``comm.step_summary``) or in the trainer's uncounted bookkeeping reductions, which it adds
    to ``bookkeeping_s``."""

    def __init__(self) -> None:
        comm.reset()  # a new run in this process: nothing of an earlier one's threads carries over
        self.begin, self.bookkeeping_s = time.perf_counter(), 0.0

    def start(self) -> None:
        comm.forget_own()  # the validation/checkpoint traffic since the last step; not a background exchange's
        self.begin, self.bookkeeping_s = time.perf_counter(), 0.0

    def compute_s(self) -> float:
        """Seconds computed so far this step."""
        waited = comm.step_summary(reset=False)["comm_s"] + self.bookkeeping_s
        return time.perf_counter() - self.begin - waited

    def stop(self) -> tuple[float, float, dict[str, Any]]:
        """(wall seconds, compute seconds, this step's traffic) of the step; resets the counts."""
        elapsed = time.perf_counter() - self.begin
        traffic = comm.step_summary()
        return elapsed, max(elapsed - traffic["comm_s"] - self.bookkeeping_s, 0.0), traffic


def step_record(cfg: JobConfig, step: int, loss: float, lr: float, grad_norm: float, elapsed: float,
                traffic: dict[str, Any], data_stats, world: int, device: torch.device) -> dict[str, Any]:
    """The metrics.jsonl record of a training step (see the module's docstring)."""
    t = cfg.train
    tokens_per_step = t.global_batch * t.seq_len
    return {
        "step": step,
        "time": time.time(),
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": step * tokens_per_step,
        "tokens_per_s": tokens_per_step / elapsed,
        "mfu": flops_per_token(cfg.model, t.seq_len) * tokens_per_step / elapsed / (cfg.metrics.peak_tflops * 1e12 * world),
        "mem_gib": peak_memory_gib(device),
        "step_s": elapsed,
        "comm_bytes": traffic["comm_bytes"],
        "comm_s": traffic["comm_s"],
        "comm_dim_s": traffic["comm_dim_s"],
        "imbalance": data_stats.imbalance,
        "padding": data_stats.padding,
    }


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this rank in GiB: CUDA max allocated, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """Writes everything on rank 0; other ranks get an instance whose calls do nothing."""

    def __init__(self, cfg: JobConfig, enabled: bool, start_step: int = 0):
        self.cfg, self.enabled = cfg, enabled
        self.history: list[dict[str, Any]] = []
        self.start_time = time.perf_counter()
        self.start_step = start_step
        self._file = self._progress = None
        self._trackers: list = []
        self._timeline_written = 0.0
        if not enabled:
            return
        os.makedirs(cfg.run.dir, exist_ok=True)
        for stale in (SUMMARY_FILE, PIPELINE_FILE):  # a previous run's: this one is not finished
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(cfg.run.dir, stale))
        path = os.path.join(cfg.run.dir, METRICS_FILE)
        if start_step == 0 and os.path.exists(path):
            os.remove(path)
        elif start_step > 0 and os.path.exists(path):
            self.history = self._truncate_after(path, start_step)
        self._file = open(path, "a")
        self._trackers = open_trackers(cfg)
        if cfg.metrics.progress and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self._task = self._progress.add_task("train", total=cfg.train.steps, completed=start_step, info="")
            self._progress.start()

    @staticmethod
    def _truncate_after(path: str, step: int) -> list[dict[str, Any]]:
        """On resume, drop lines of steps the resumed run will log again; returns the rest."""
        with open(path) as fh:
            kept = [json.loads(line) for line in fh if line.strip()]
        kept = [r for r in kept if r["step"] <= step]
        # A new file, not a rewrite in place: a reader following the old one sees it replaced.
        with atomic_write(path, "w", durable=False) as fh:
            fh.writelines(json.dumps(r) + "\n" for r in kept)
        return kept

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.history.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        log_to(self._trackers, scalars(record), record["step"])
        if "loss" not in record:  # the step-0 validation before training
            print(f"step 0  val {record['val_loss']:.4f}", flush=True)
            return
        text = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s"
        if "val_loss" in record:
            text += f"  val {record['val_loss']:.4f}"
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], info=text)
        else:
            done = record["step"] - self.start_step
            elapsed = time.perf_counter() - self.start_time
            eta = elapsed / max(done, 1) * (self.cfg.train.steps - record["step"])
            print(f"step {record['step']}/{self.cfg.train.steps}  {text}  eta {eta:.0f}s", flush=True)

    def timeline(self, step: int, timelines: list[dict], last: bool) -> None:
        """Write ``run.dir/pipeline.json``: this step's pipeline timeline (every pp rank's compute
        intervals), at most once a second and at the last step."""
        now = time.monotonic()
        if not self.enabled or not timelines or (now - self._timeline_written < TIMELINE_EVERY_S and not last):
            return
        self._timeline_written = now
        try:
            with atomic_write(os.path.join(self.cfg.run.dir, PIPELINE_FILE), "w", durable=False) as fh:
                json.dump({"step": step, "schedule": self.cfg.parallel.pp_schedule, "ranks": timelines}, fh)
        except OSError:  # a view for the page: a full disk must not stop the training
            pass

    def close(self) -> dict[str, Any]:
        """Stop the display, write loss_curve.png and return the run summary."""
        if not self.enabled:
            return {}
        if self._progress is not None:
            self._progress.stop()
        for tracker in self._trackers:
            with contextlib.suppress(Exception):  # the run is over; a tracker's goodbye cannot undo it
                tracker.close()
        self._file.close()
        summary = self.summary()
        with open(os.path.join(self.cfg.run.dir, SUMMARY_FILE), "w") as fh:
            json.dump(summary, fh, indent=1)
        if self.cfg.metrics.plot:
            self._plot()
        return summary

    def summary(self) -> dict[str, Any]:
        vals = [r["val_loss"] for r in self.history if "val_loss" in r]
        rows = [r for r in self.history if "loss" in r]
        return {
            "steps": rows[-1]["step"] if rows else self.start_step,
            "final_loss": rows[-1]["loss"] if rows else math.nan,
            "first_val_loss": vals[0] if vals else None,
            "final_val_loss": vals[-1] if vals else None,
            "tokens": rows[-1]["tokens"] if rows else 0,
            "mean_tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows) if rows else 0.0,
            "peak_mem_gib": max((r["mem_gib"] for r in rows), default=0.0),
            "wall_s": time.perf_counter() - self.start_time,
        }

    def _plot(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        rows = [r for r in self.history if "loss" in r]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
        vals = [(r["step"], r["val_loss"]) for r in self.history if "val_loss" in r]
        if vals:
            ax.plot(*zip(*vals), "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(self.cfg.run.dir, "loss_curve.png"), dpi=100)
        plt.close(fig)
