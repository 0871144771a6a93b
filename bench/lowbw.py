"""Training over a slow link: DDP against DiLoCo and Streaming DiLoCo, each with none/int8/int4
outer gradients, on 4 workers of the demo corpus (Shakespeare) with the same token budget.

Every run is 4 gloo ranks (one worker each, or DDP over 4) training the same small Llama on the
same data order. The link between workers is emulated at ``--link-mbit`` Mbit/s with
``--latency-ms`` latency (``comm.emulate_bandwidth`` / ``comm.emulate_latency`` on the dimension
the runs synchronise over), so wall time includes what the syncs would cost on such a link.
For each run it prints: final validation loss and its difference from DDP's, total bytes sent
by one rank (all collectives), peak bytes of one sync (DDP: one step's all-reduce), the ratio of
DDP's total bytes to the run's, and wall time. A PNG of validation loss against bytes sent goes
to ``--out``.

    PYTHONPATH=. .venv/bin/python bench/lowbw.py [--steps 400] [--link-mbit 100] [--out runs/bench_lowbw]
    PYTHONPATH=. .venv/bin/python bench/lowbw.py --smoke   # a few steps, tiny model
    PYTHONPATH=. .venv/bin/python bench/lowbw.py --sweep   # where DiLoCo's gap to DDP comes from
    PYTHONPATH=. .venv/bin/python bench/lowbw.py --warm-start 400   # the DiLoCo paper's protocol
    PYTHONPATH=. .venv/bin/python bench/lowbw.py --time-to-target --warm-start 300   # fine-tuning, 3 links

``--warm-start W`` first trains the model with DDP for W steps (constant lr after warmup, no
link emulation) and starts every run from those weights (``checkpoint.init_from``), as the
DiLoCo paper starts both DiLoCo and its baseline from one pretrained checkpoint. The shared
warm phase's bytes are printed once and are not in any run's total. The runs after it read
the data in another order (``train.seed`` 1), so they do not repeat the warm phase's batches.
It uses every core: run it alone.

``--time-to-target`` is the fine-tuning race of the zeroth-order issue. The demo model (the
``--warm-start`` DDP phase on Shakespeare) is fine-tuned on a second corpus every Python carries
offline (the language reference's topics, ``pydoc_data.topics``, in chunks of about 2,000
characters) with the warm phase's tokenizer, by DDP, DiLoCo (int8), Streaming DiLoCo (int8) and
``zo`` (one byte per step), each over emulated links of ``--links`` Mbit/s (default 1000, 100,
10). Time is the sum of the training steps' wall time (``step_s``: compute plus the emulated
links' waits; evaluations and checkpoints left out), bytes are rank 0's on all dimensions. The
targets are validation losses DDP reaches on the fastest link: its start minus ``--target``
fractions of its whole drop. It prints each run's time and bytes to each target and writes
``time_to_target.png`` (validation loss against time, one panel per link) and ``table.md``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time

from plait.config import build_config
from plait.launch import preflight, spawn
from plait.train.trainer import run_training

RANKS = 4


def sweep_runs() -> list[tuple[str, dict]]:
    """``--sweep``: where DiLoCo's gap to DDP comes from at this scale (sync period, outer
    optimizer, inner lr), without quantization, link emulation off."""
    avg = {"lowbw.method": "diloco", "lowbw.outer_lr": 1.0, "lowbw.outer_momentum": 0.0}
    return [
        ("ddp", {}),
        ("ddp lr 6e-3", {"train.lr": 6e-3}),
        ("average every step (H=1)", {**avg, "lowbw.inner_steps": 1, "lowbw.check_sync": False}),
        ("average H=16", {**avg, "lowbw.inner_steps": 16}),
        ("diloco H=50 lr 1.5e-3", {"lowbw.method": "diloco", "lowbw.inner_steps": 50, "train.lr": 1.5e-3}),
        ("diloco H=50 lr 6e-3", {"lowbw.method": "diloco", "lowbw.inner_steps": 50, "train.lr": 6e-3}),
    ]


def runs(args) -> list[tuple[str, dict]]:
    """(label, lowbw overrides) of every configuration, DDP first."""
    out = [("ddp", {})]
    methods = [(f"diloco H={h}", {"lowbw.method": "diloco", "lowbw.inner_steps": h}) for h in args.diloco_h]
    methods += [(f"streaming P=4 H={h}", {"lowbw.method": "streaming", "lowbw.inner_steps": h, "lowbw.fragments": 4,
                                          "lowbw.overlap_steps": max(1, h // 20)}) for h in args.streaming_h]
    if args.smoke:
        methods = [("diloco H=2", {"lowbw.method": "diloco", "lowbw.inner_steps": 2}),
                   ("streaming P=2 H=2", {"lowbw.method": "streaming", "lowbw.inner_steps": 2, "lowbw.fragments": 2})]
    for label, values in methods:
        for quant in ("none", "int8", "int4"):
            extra = {"lowbw.quantize": quant, "lowbw.error_feedback": quant == "int4"}
            out.append((f"{label} {quant}{' +EF' if quant == 'int4' else ''}", {**values, **extra}))
    return out


def base_values(args, root: str) -> dict:
    model = ({"model.dim": 128, "model.n_layers": 4, "model.n_heads": 4, "model.ffn_dim": 384}
             if not args.smoke else {"model.dim": 32, "model.n_layers": 2, "model.n_heads": 2, "model.ffn_dim": 64})
    return {
        **model, "model.max_seq_len": args.seq_len, "data.source": "demo", "data.tokenizer": args.tokenizer,
        "train.seq_len": args.seq_len, "train.global_batch": args.global_batch, "train.micro_batch": args.micro_batch,
        "train.steps": args.steps, "train.lr": args.lr, "train.warmup_steps": min(20, args.steps // 10),
        "train.eval_every": args.eval_every,
        "train.eval_batches": 16, "train.sample_tokens": 0, "train.device": "cpu",
        "parallel.nproc": RANKS, "parallel.dp_replicate": RANKS, "parallel.dp_shard": 1, "parallel.zero": 0,
        "metrics.tensorboard": False, "metrics.plot": False, "metrics.progress": False,
        "comm.emulate_bandwidth": f"dp={args.link_mbit * 1e6 / 8:g},dp_replicate={args.link_mbit * 1e6 / 8:g}",
        "comm.emulate_latency": f"dp={args.latency_ms / 1e3:g},dp_replicate={args.latency_ms / 1e3:g}",
        "run.dir": root,
    }


def _override(item: str) -> tuple[str, object]:
    """'lowbw.outer_lr=0.4' -> ('lowbw.outer_lr', 0.4): numbers and booleans as JSON, else text."""
    if "=" not in item:
        print(f"lowbw.py: error: override '{item}' needs KEY=VALUE, e.g. lowbw.outer_lr=0.4", file=sys.stderr)
        sys.exit(2)
    key, raw = item.split("=", 1)
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def warm_start(args) -> str:
    """Train the shared starting point: DDP for ``--warm-start`` steps; returns its run dir."""
    root = args.warm_dir or os.path.join(args.out, "warm_start")
    values = {**base_values(args, root), "train.steps": args.warm_start, "train.eval_every": args.warm_start,
              "train.schedule": "constant", "comm.emulate_bandwidth": "", "comm.emulate_latency": ""}
    record = os.path.join(root, "warm_start.json")
    if os.path.isfile(record):  # the same warm phase as before: reuse its checkpoint
        with open(record) as fh:
            saved = json.load(fh)
        if saved["values"] == values:
            print(f"{'warm start (DDP, shared)':<28} val {saved['val_loss']:.4f}  reused from {root}", flush=True)
            return root
    shutil.rmtree(root, ignore_errors=True)
    r = run_one(values)
    print(f"{'warm start (DDP, shared)':<28} val {r['val_loss']:.4f}  {args.warm_start} steps  bytes "
          f"{r['total_bytes'] / 1e6:10.2f} MB (not counted below)  wall {r['wall_s']:6.1f} s", flush=True)
    with open(record, "w") as fh:
        json.dump({"values": values, "val_loss": r["val_loss"]}, fh)
    return root


def run_one(values: dict) -> dict:
    cfg = preflight(build_config(values=values), RANKS)
    begin = time.perf_counter()
    spawn(run_training, RANKS, (cfg,), "gloo")
    wall = time.perf_counter() - begin
    with open(os.path.join(cfg.run.dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    steps = [r for r in rows if "loss" in r]
    total = sum(sum(r["comm_bytes"].values()) for r in steps)
    if values.get("lowbw.method", "none") == "none":
        peak = max(sum(r["comm_bytes"].values()) for r in steps)
    else:
        peak = max(r.get("sync_bytes", 0) for r in steps)
    timed = evaluation_curve(rows)
    curve = [(sent, val) for _, sent, val in timed]
    return {"val_loss": curve[-1][1], "total_bytes": total, "peak_bytes": peak, "wall_s": wall, "curve": curve,
            "timed_curve": timed}


def write_finetune_corpus(path: str) -> int:
    """The second corpus: the Python language reference's topics (shipped with Python, so
    offline everywhere), one JSONL document per chunk of about 2,000 characters; returns the
    number of documents."""
    import pydoc_data.topics

    documents = []
    for name in sorted(pydoc_data.topics.topics):
        chunk = ""
        for paragraph in pydoc_data.topics.topics[name].split("\n\n"):
            chunk = f"{chunk}\n\n{paragraph}" if chunk else paragraph
            if len(chunk) >= 2000:
                documents.append(chunk)
                chunk = ""
        if chunk.strip():
            documents.append(chunk)
    with open(path, "w") as fh:
        for text in documents:
            fh.write(json.dumps({"text": text}) + "\n")
    return len(documents)


def target_runs(args) -> list[tuple[str, dict]]:
    """(label, overrides) of the fine-tuning race, DDP first. DiLoCo is evaluated at its syncs
    (its global model), the others every ``--eval-every`` steps (``--zo-eval-every`` for zo)."""
    h = args.target_h
    return [
        ("ddp", {"train.steps": args.steps}),
        (f"diloco H={h} int8", {"lowbw.method": "diloco", "lowbw.inner_steps": h, "lowbw.quantize": "int8",
                                "train.steps": args.steps, "train.eval_every": h}),
        (f"streaming P=4 H={2 * h} int8", {"lowbw.method": "streaming", "lowbw.inner_steps": 2 * h,
                                            "lowbw.fragments": 4, "lowbw.overlap_steps": 1, "lowbw.quantize": "int8",
                                            "train.steps": args.steps}),
        ("zo 8-bit", {"lowbw.method": "zo", "lowbw.zo_eps": args.zo_eps, "lowbw.zo_samples": 1,
                      "lowbw.zo_params": args.zo_params, "train.lr": args.zo_lr, "train.steps": args.zo_steps,
                      "train.eval_every": args.zo_eval_every}),
    ]


def size(nbytes: float) -> str:
    """Bytes in the unit that keeps 3 significant digits readable."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


def evaluation_curve(rows: list[dict]) -> list[tuple[float, float, float]]:
    """(training seconds, bytes sent by rank 0, validation loss) at every evaluation of a run's
    metrics rows; training seconds sum the steps' ``step_s`` (evaluations left out)."""
    curve, seconds, sent = [], 0.0, 0
    for r in rows:
        seconds += r.get("step_s", 0.0)
        sent += sum(r.get("comm_bytes", {}).values())
        if "val_loss" in r:
            curve.append((seconds, sent, r["val_loss"]))
    return curve


def reached(curve: list[tuple[float, float, float]], target: float) -> tuple[float, float] | None:
    """(seconds, bytes) at the first evaluation at or below ``target``; None if never."""
    return next(((t, b) for t, b, v in curve if v <= target), None)


def time_to_target(args) -> int:
    warm = warm_start(args)
    tokenizer = sorted(glob.glob(os.path.join(warm, "checkpoints", "step_*", "tokenizer.json")))[-1]
    corpus = os.path.join(args.out, "python_docs.jsonl")
    print(f"fine-tuning corpus: {write_finetune_corpus(corpus)} documents of the Python language reference", flush=True)
    results: dict[str, dict] = {}
    for mbit in args.links:
        args.link_mbit = mbit
        for label, values in target_runs(args):
            key = f"{mbit:g} Mbit/s {label}"
            run_dir = os.path.join(args.out, key.replace(" ", "_").replace("/", "").replace("=", ""))
            shutil.rmtree(run_dir, ignore_errors=True)
            run = run_one({**base_values(args, run_dir), "checkpoint.init_from": warm, "data.source": corpus,
                     "data.tokenizer": tokenizer, "data.val_fraction": 0.1, "train.schedule": "constant",
                     "train.warmup_steps": 5, **values})
            curve = run["timed_curve"]
            results[key] = {"link_mbit": mbit, "method": label, "curve": curve}
            print(f"{key:<36} val {curve[0][2]:.4f} -> {curve[-1][2]:.4f} (best {min(v for *_, v in curve):.4f})  "
                  f"{curve[-1][0]:7.1f} s of training  {size(curve[-1][1])}", flush=True)
            with open(os.path.join(args.out, "results.json"), "w") as fh:
                json.dump(results, fh, indent=1)
    fastest = f"{max(args.links):g} Mbit/s ddp"
    start, end = results[fastest]["curve"][0][2], min(v for _, _, v in results[fastest]["curve"])
    targets = [start - f * (start - end) for f in args.target]
    lines = ["| link | method | " + " | ".join(f"to {t:.3f} ({100 * f:g}% of DDP's drop)" for t, f in
                                                zip(targets, args.target)) + " | final val (steps) |",
             "|---|---|" + "---|" * (len(targets) + 1)]
    for key, r in results.items():
        cells = []
        for target in targets:
            hit = reached(r["curve"], target)
            cells.append("not reached" if hit is None else f"{hit[0]:.1f} s, {size(hit[1])}")
        steps = next(v["train.steps"] for label, v in target_runs(args) if label == r["method"])
        lines.append(f"| {r['link_mbit']:g} Mbit/s | {r['method']} | " + " | ".join(cells)
                     + f" | {r['curve'][-1][2]:.3f} ({steps}) |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(table + "\n")
    plot_race(results, targets, args.links, os.path.join(args.out, "time_to_target.png"))
    return 0


def plot_race(results: dict, targets: list[float], links: list[float], path: str) -> None:
    """One panel per link of validation loss against training time, and one against bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(links) + 1, figsize=(4.5 * (len(links) + 1), 4.5), sharey=True)
    for index, ax in enumerate(axes):
        by_bytes = index == len(links)
        for r in results.values():
            if r["link_mbit"] == (links[0] if by_bytes else links[index]):  # bytes are the same on every link
                points = [(b if by_bytes else t, v) for t, b, v in r["curve"] if (b if by_bytes else t) > 0]
                ax.plot([x for x, _ in points], [v for _, v in points], marker=".", markersize=3, label=r["method"])
        for target in targets:
            ax.axhline(target, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_title("bytes sent (any link)" if by_bytes else f"{links[index]:g} Mbit/s link")
        ax.set_xlabel("bytes sent by rank 0" if by_bytes else "training wall time (s)")
    axes[0].set_ylabel("validation loss (Python docs)")
    axes[0].legend(fontsize=8)
    fig.suptitle("fine-tuning the demo model on 4 workers (dashed: targets, fractions of DDP's drop)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(results: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, r in results.items():
        points = [(b, v) for b, v in r["curve"] if b > 0]  # a log axis has no place for 0 bytes
        ax.plot([b for b, _ in points], [v for _, v in points], marker=".", label=label,
                linewidth=2 if label == "ddp" else 1)
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent by one rank")
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss against bytes sent (4 workers)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 400; smoke 4; time-to-target 60)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=16, help="sequences per step, all workers together")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per forward on one rank")
    parser.add_argument("--lr", type=float, default=3e-3, help="DDP's and the inner AdamW's peak learning rate")
    parser.add_argument("--diloco-h", type=int, nargs="*", default=[50, 200], help="DiLoCo sync periods to run")
    parser.add_argument("--streaming-h", type=int, nargs="*", default=[100], help="Streaming (P=4) sync periods")
    parser.add_argument("--tokenizer", default="bpe:2048")
    parser.add_argument("--eval-every", type=int, default=None, help="default steps/8 (time-to-target: 1)")
    parser.add_argument("--link-mbit", type=float, default=100.0, help="emulated link, Mbit/s")
    parser.add_argument("--latency-ms", type=float, default=10.0, help="emulated latency per collective")
    parser.add_argument("--only", nargs="*", help="run only the labels starting with these (spaces may be written _)")
    parser.add_argument("--skip-ddp", action="store_true", help="with --only: leave the DDP baseline out "
                        "(another process runs it)")
    parser.add_argument("--warm-start", type=int, default=0, metavar="W",
                        help="start every run from a DDP checkpoint after W steps (0: from scratch)")
    parser.add_argument("--warm-dir", default="", help="where the warm phase trains (default OUT/warm_start); "
                        "an earlier identical warm phase there is reused")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every DiLoCo-family run, e.g. lowbw.outer_lr=0.4")
    parser.add_argument("--ddp-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for the DDP baseline, e.g. train.lr=0.004")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 4 steps, two methods")
    parser.add_argument("--sweep", action="store_true", help="the gap analysis (sync period, outer optimizer, lr)")
    parser.add_argument("--time-to-target", action="store_true",
                        help="fine-tune the warm-start model on a second corpus over --links (see the doc)")
    parser.add_argument("--links", type=float, nargs="+", default=[1000.0, 100.0, 10.0], help="Mbit/s")
    parser.add_argument("--target", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.9],
                        help="targets: fractions of DDP's drop in validation loss on the fastest link")
    parser.add_argument("--target-h", type=int, default=10, help="DiLoCo's H in the race (Streaming: 2H)")
    parser.add_argument("--zo-steps", type=int, default=800)
    parser.add_argument("--zo-lr", type=float, default=1e-3, help="zo's constant lr (3e-3 diverges here)")
    parser.add_argument("--zo-eps", type=float, default=1e-3)
    parser.add_argument("--zo-params", default="all", choices=["all", "norms_and_output"])
    parser.add_argument("--zo-eval-every", type=int, default=10)
    parser.add_argument("--out", default="runs/bench_lowbw")
    args = parser.parse_args(argv)
    results: dict[str, dict] = {}
    if args.time_to_target:
        args.steps, args.eval_every = args.steps or 60, args.eval_every or 1
        if not args.warm_start:
            parser.error("--time-to-target fine-tunes the demo model: give --warm-start W (its DDP steps)")
        if args.only or args.set or args.ddp_set or args.sweep or args.smoke:
            parser.error("--time-to-target runs its own four methods: --only, --set, --ddp-set, --sweep and "
                         "--smoke do not apply")
        os.makedirs(args.out, exist_ok=True)
        return time_to_target(args)
    os.makedirs(args.out, exist_ok=True)
    args.steps = args.steps or (4 if args.smoke else 400)
    args.eval_every = args.eval_every or max(args.steps // 8, 1)
    method_extra, ddp_extra = (dict(_override(item) for item in items) for items in (args.set, args.ddp_set))
    # After a warm start the runs read the data in another order (train.seed 1): with the warm
    # phase's order they would repeat exactly its batches.
    start = {"checkpoint.init_from": warm_start(args), "train.seed": 1} if args.warm_start else {}
    if args.sweep:
        args.link_mbit, args.latency_ms = 1e6, 0.0  # losses only: no emulated link
    for label, values in (sweep_runs() if args.sweep else runs(args)):
        if args.only and not (label == "ddp" and not args.skip_ddp) and not any(
                label.replace(" ", "_").startswith(o.replace(" ", "_")) for o in args.only):
            continue
        run_dir = os.path.join(args.out, label.replace(" ", "_").replace("=", "").replace("+", ""))
        extra = ddp_extra if label == "ddp" else method_extra
        results[label] = r = run_one({**base_values(args, run_dir), **start, **values, **extra})
        ddp = results.get("ddp")
        versus = (f" ({100 * (r['val_loss'] / ddp['val_loss'] - 1):+5.2f}% vs DDP)  " if ddp else "  ")
        fewer = f" ({ddp['total_bytes'] / max(r['total_bytes'], 1):7.1f}x fewer)  " if ddp else "  "
        print(f"{label:<28} val {r['val_loss']:.4f}{versus}bytes {r['total_bytes'] / 1e6:10.2f} MB{fewer}"
              f"peak/sync {r['peak_bytes'] / 1e6:8.3f} MB  wall {r['wall_s']:6.1f} s", flush=True)
        with open(os.path.join(args.out, "results.json"), "w") as fh:  # after each run: a cut-off keeps the rest
            json.dump(results, fh, indent=1)
    path = os.path.join(args.out, "lowbw_val_vs_bytes.png")
    plot(results, path)
    print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
