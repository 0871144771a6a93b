"""Memory options side by side on 2 CPU ranks (FSDP over both): device-side peak, what is kept
for backward, host memory, step time, and the planner's prediction of the same breakdown.

Modes: ``none``; ``ac_full`` (activation checkpointing of every block); ``act_offload`` (every
block's saved tensors to host memory); ``recompute_0.25/0.5/0.75`` (token-wise recompute);
``offload_optimizer`` and ``offload_params``. Every rank builds one trainer per mode, takes one
warm-up step, then measures one step on a fixed micro-batch:

- **device peak**: the most tensor storage held at once on the device side
  (plait/telemetry/device_memory.py: host copies, the host optimizer step and host-resident
  model state do not count; on CPU nothing else tells device from host);
- **saved**: the most bytes autograd kept for backward on the device (the saved-activation
  meter, plait/telemetry/saved_activations.py) and, for activation offload, in host memory;
- **host peak**: the same for host memory (offloaded model state, the host optimizer step's
  copies, offloaded activations);
- **step time**: the mean of the fastest quarter of ``--rounds`` steps (the least disturbed), the
  modes interleaved round by round so that drift in the shared machine's speed hits them alike,
  each timed step after an untimed one in the same mode; and **step / none**, the median over the
  rounds of each step's time over the same round's ``none`` step, seconds apart, which the
  machine's drift cancels out of (the time order is checked on it). Steps vary by +-20% on this shared
  2-core machine, so the activation modes (none, checkpointing, activation offload, token-wise
  recompute) are timed on one model switched between them, which keeps differences between
  trainer instances (where their tensors landed) out of their comparison; the two offload modes
  need trainers of their own.

The planner's ``predicted_memory`` (plait/plan/job.py) gives the same breakdown; the table shows
predicted / measured for the device and host totals. Assertions (the issue's acceptance):
activation offload keeps at most 10% of the saved activations on the device; token-wise recompute
lies strictly between no checkpointing and full checkpointing in saved memory and in time,
monotonically in the fraction; the planner is within 15% of the measured device and host totals
of every offload mode.

    .venv/bin/python bench/memory.py [--rounds 20] [--seq 512] [--out bench_memory.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from plait.data.loader import collate  # noqa: E402
from plait.launch import spawn  # noqa: E402
from plait.parallel.recompute import apply_activation_checkpointing  # noqa: E402
from plait.parallel.token_recompute import apply_tokenwise_recompute, remove_tokenwise_recompute  # noqa: E402
from plait.plan.job import predicted_memory  # noqa: E402
from plait.telemetry.device_memory import DeviceMemory  # noqa: E402
from plait.telemetry.saved_activations import SavedActivations  # noqa: E402
from plait.train import memory_report as memory  # noqa: E402
from plait.train import micro_batch  # noqa: E402
from plait.train.trainer import Trainer  # noqa: E402
from tests.parallel.harness import job, write_corpus  # noqa: E402

MODES = {
    "none": {},
    "ac_full": {"train.activation_checkpointing": "full"},
    "act_offload": {"memory.activation_offload": -1},
    "recompute_0.25": {"memory.recompute_fraction": 0.25},
    "recompute_0.5": {"memory.recompute_fraction": 0.5},
    "recompute_0.75": {"memory.recompute_fraction": 0.75},
    "offload_optimizer": {"memory.offload": "optimizer"},
    "offload_params": {"memory.offload": "params"},
}
# Timed on one model, switched between them (see rank_main).
SWITCHED = ("none", "ac_full", "act_offload", "recompute_0.25", "recompute_0.5", "recompute_0.75")
MIB = 2**20


def model_values(seq: int) -> dict:
    """The bench's model: 4 layers of width 256, GQA 8/4, SwiGLU 768, fp32, FSDP over 2 ranks."""
    return {"model.dim": 256, "model.n_layers": 4, "model.n_heads": 8, "model.n_kv_heads": 4, "model.ffn_dim": 768,
            "model.max_seq_len": seq, "train.seq_len": seq, "train.micro_batch": 4, "train.global_batch": 8,
            "parallel.dp_shard": 2, "data.tokenizer": "bpe:512", "data.val_fraction": 0.0, "train.sample_tokens": 0}


def measure(trainer: Trainer, batch: dict) -> dict:
    """One measured step after a warm-up one (the optimizer state exists, as in training)."""
    offload = trainer.cfg.memory.offload
    micro_batch._step(trainer, batch)
    trainer.optimizer.zero_grad(set_to_none=True)
    host = memory.in_host_memory(offload)
    tracker, meter = DeviceMemory(), SavedActivations()
    tracker.add(*(p for part in trainer.parts for p in part.parameters()), host="params" in host)
    inner = getattr(trainer.optimizer, "optim", trainer.optimizer)
    tracker.add(*(v for state in inner.state.values() for v in state.values() if torch.is_tensor(v)),
                host="optimizer" in host)
    ledgers = memory.offload_ledgers(trainer.parts)
    for ledger in ledgers:
        ledger.host_peak = ledger.host_now
    with tracker, meter:
        micro_batch._step(trainer, batch, tracker)
    located = memory.located_state(trainer.parts, trainer.optimizer, offload)
    trainer.optimizer.zero_grad(set_to_none=True)
    return {"device_peak": tracker.peak, "host_peak": tracker.host_peak, "saved_device": meter.peak,
            "saved_host": sum(ledger.host_peak for ledger in ledgers), **{
                f"{where}_{kind}": located[where][kind] for where in ("device", "host") for kind in memory.STATE}}


def timed_step(trainer: Trainer, batch: dict) -> float:
    """One training step, both ranks starting together, no garbage collection inside."""
    gc.collect()
    dist.barrier()
    begin = time.perf_counter()
    trainer.train_step([batch])
    return time.perf_counter() - begin


def switch(trainer: Trainer, values: dict) -> None:
    """Put an activation mode of MODES on the ``switched`` trainer's own model."""
    for part in trainer.parts:
        remove_tokenwise_recompute(part)
        apply_activation_checkpointing(part, values.get("train.activation_checkpointing", "none"))
        apply_tokenwise_recompute(part, values.get("memory.recompute_fraction", 0.0))
        part.activation_offload.enabled = values.get("memory.activation_offload", 0) != 0


def rank_main(workdir: str, seq: int, rounds: int) -> dict:
    torch.set_num_threads(1)
    trainers = {name: Trainer(job(workdir, name, **{**model_values(seq), **values, "parallel.nproc": 2}))
                for name, values in MODES.items()}
    any_trainer = next(iter(trainers.values()))
    batch = collate([any_trainer.data.train[i] for i in range(any_trainer.cfg.train.micro_batch)])
    out = {name: measure(trainer, batch) for name, trainer in trainers.items()}
    # Timing: the activation modes on one model switched between them (see the module doc);
    # the offload modes need trainers of their own.
    switched = Trainer(job(workdir, "switched", **{**model_values(seq), "memory.activation_offload": -1,
                                                   "parallel.nproc": 2}))
    runs = {name: (switched, values) if name in SWITCHED else (trainers[name], None) for name, values in MODES.items()}
    for trainer, values in runs.values():
        if values is not None:
            switch(trainer, values)
        timed_step(trainer, batch)  # the first step reports memory: not timed
    gc.disable()  # collections of the trainers' objects would land in random steps
    times: dict[str, list[float]] = {name: [] for name in MODES}
    for _ in range(rounds):
        for name, (trainer, values) in runs.items():
            if values is not None:
                switch(trainer, values)
            timed_step(trainer, batch)  # after a switch the first step meets new buffer sizes
            times[name].append(timed_step(trainer, batch))
    gc.enable()
    for name, trainer in trainers.items():
        fastest = sorted(times[name])[:max(1, len(times[name]) // 4)]
        out[name]["step_s"] = sum(fastest) / len(fastest)
        # Against `none` in the same round (seconds apart): the machine's drift cancels.
        out[name]["time_vs_none"] = statistics.median(t / base for t, base in zip(times[name], times["none"]))
        out[name]["step_times"] = times[name]
        out[name]["predicted"] = predicted_memory(trainer.cfg, 2)
    return out


def check(rows: dict, timing: bool = True) -> list[str]:
    """The acceptance checks; returns what failed. ``timing``: the step-time order too (a
    quick run's single step on a shared machine is too noisy to order)."""
    failed = []
    none, full = rows["none"], rows["ac_full"]
    if rows["act_offload"]["saved_device"] > 0.1 * none["saved_device"]:
        failed.append("activation offload kept more than 10% of the saved activations on the device")
    fractions = [rows[f"recompute_{f}"] for f in ("0.25", "0.5", "0.75")]
    for key, label in (("saved_device", "saved memory"), ("time_vs_none", "step time"))[:2 if timing else 1]:
        series = [none[key], *(r[key] for r in fractions), full[key]]
        decreasing = key == "saved_device"
        ordered = all((a > b) if decreasing else (a < b) for a, b in zip(series, series[1:]))
        if not ordered:
            failed.append(f"token-wise recompute is not between none and full, monotonically, in {label}: {series}")
    for name in ("offload_optimizer", "offload_params"):
        for where in ("device", "host"):
            ratio = rows[name][f"{where}_ratio"]
            if abs(ratio - 1) > 0.15:
                failed.append(f"planner {where} memory for {name} is {ratio:.2f}x the measured")
    return failed


def summarize(rank_rows: dict) -> dict:
    rows = {}
    for name, row in rank_rows.items():
        predicted = row.pop("predicted")
        measured_device = row["device_peak"]
        measured_host = row["host_peak"]
        row["predicted_device"] = sum(predicted["device"].values())
        row["predicted_host"] = sum(predicted["host"].values())
        row["device_ratio"] = row["predicted_device"] / measured_device
        row["host_ratio"] = row["predicted_host"] / measured_host if measured_host else (
            1.0 if row["predicted_host"] == 0 else float("inf"))
        row["predicted_breakdown"] = predicted
        rows[name] = row
    return rows


def table(rows: dict) -> str:
    head = ("| mode | device peak MiB | saved on device MiB | saved in host MiB | host peak MiB "
            "| step s | step / none | planner device / measured | planner host / measured |")
    lines = [head, "|" + "---|" * 9]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['device_peak'] / MIB:.1f} | {r['saved_device'] / MIB:.1f} | "
                     f"{r['saved_host'] / MIB:.1f} | {r['host_peak'] / MIB:.1f} | {r['step_s']:.3f} | {r['time_vs_none']:.3f} | "
                     f"{r['device_ratio']:.2f} | {r['host_ratio']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per mode (the fastest quarter counts)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--out", default="", help="write the figures as JSON here")
    parser.add_argument("--no-time-check", action="store_true",
                        help="do not assert the step-time order (quick runs with one round)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Freed buffers stay in the ranks' heaps instead of going back to the OS and coming back as
    # fresh zeroed pages, which made steps of one mode vary by +-20% (glibc reads these at start).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**30))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(2**34))
    with tempfile.TemporaryDirectory() as workdir:
        write_corpus(workdir, n_docs=300)
        results = spawn(rank_main, 2, (workdir, args.seq, args.rounds))
    rows = summarize(results[0])
    print(table(rows))
    failed = check(rows, timing=not args.no_time_check)
    for line in failed:
        print(f"FAILED: {line}")
    if not failed:
        print("all acceptance checks hold (asserted)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"rows": rows, "failed": failed, "rounds": args.rounds, "seq": args.seq}, fh, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
