"""Predicted vs published iteration time for the 10 rows of Megatron-LM's Table 1 (weak scaling).

Narayanan et al., SC21 (arXiv 2104.04473), as listed in shared/REFERENCE_NUMBERS.md: A100 80GB,
8 per node on NVLink3, one 200 Gb/s HDR NIC per GPU, GELU FFN of 4h, MHA, V = 51,200, s = 2,048,
16-bit, full recompute, no sequence parallelism (it came a year later), dropout, attention scores
materialized (no flash attention), gradients all-reduced after backward (no overlap), no ZeRO.

    PYTHONPATH=. .venv/bin/python bench/planner_published.py [--json]

Table 1 is the calibration data (the GPU constants were set from it). The script then predicts
the validation runs (plait/plan/validation.py: PUBLISHED_RUNS, other papers' runs the constants
were never fitted to) and prints their errors, which are the GPU uncertainty bands of
``plait plan``.
"""

from __future__ import annotations

import argparse
import json

from plait.plan.estimate import estimate
from plait.layout import Layout
from plait.layout import resolve_schedule
from plait.plan.spec import PlanCluster, PlanModel, PlanTrain, build_cluster
from plait.plan.validation import PUBLISHED_RUNS, leave_one_out, rms

# params (B), heads, hidden, layers, TP, PP, GPUs, global batch, micro-batch, layers per virtual
# stage (0: not interleaved), published iteration time (s)
TABLE_1 = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 16, 0, 3.53),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 16, 0, 3.70),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 16, 0, 3.70),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 8, 0, 9.40),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 4, 0, 14.45),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 2, 5, 16.06),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 2, 5, 24.82),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 1, 3, 37.61),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 1, 1, 54.08),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 1, 0, 102.63),
]


def predict_rows() -> list[dict]:
    """One dict per row: the published and predicted iteration time, error and memory."""
    rows = []
    for params, heads, hidden, layers, tp, pp, gpus, batch, mbs, per_chunk, published in TABLE_1:
        model = PlanModel(n_layers=layers, dim=hidden, n_heads=heads, ffn_dim=4 * hidden, vocab_size=51200,
                          mlp="gelu")
        train = PlanTrain(global_batch=batch, seq_len=2048, dtype="bf16", attention="eager",
                          sequence_parallel=False, overlap_grad_reduce=False, dropout=True)
        cluster = build_cluster(PlanCluster(gpu="a100-80gb", gpus=gpus, gpus_per_node=8,
                                            intra_link="nvlink3", inter_link="ib-hdr"))
        vpp = layers // (pp * per_chunk) if per_chunk else 1
        dp = gpus // (tp * pp)
        layout = Layout(tp=tp, pp=pp, vpp=vpp, dp=dp, cp=1, ep=1, micro_batch=mbs, zero=0, recompute="full",
                        schedule=resolve_schedule("auto", pp, vpp))
        est = estimate(model, train, cluster, layout)
        rows.append({
            "params_b": params, "gpus": gpus, "layout": f"tp={tp} pp={pp} v={vpp} dp={dp} mbs={mbs}",
            "published_s": published, "predicted_s": est.step_time_s,
            "error": (est.step_time_s - published) / published,
            "memory_gib": est.memory.total / 2**30, "fits": est.fits,
            "breakdown": est.breakdown(),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    rows = predict_rows()
    mape = sum(abs(r["error"]) for r in rows) / len(rows)
    validation = [{"name": run.name, "source": run.source, "class": run.layout_class, "published_s": run.measured_s,
                   "predicted_s": run.predict(), "error": run.error()} for run in PUBLISHED_RUNS]
    held = leave_one_out([(v["class"], v["error"]) for v in validation])
    summary = {"mape": sum(abs(v["error"]) for v in validation) / len(validation),
               "rms": rms([v["error"] for v in validation]),
               "inside_leave_one_out_band": sum(abs(e) <= b for e, b in held)}
    if args.json:
        print(json.dumps({"rows": rows, "mape": mape, "validation": validation, "validation_summary": summary},
                         indent=1))
        return
    print(f"{'params':>8} {'GPUs':>5} {'layout':<28} {'published':>9} {'predicted':>9} {'error':>7} {'memory':>9} fits")
    for r in rows:
        print(f"{r['params_b']:>7.1f}B {r['gpus']:>5} {r['layout']:<28} {r['published_s']:>8.2f}s "
              f"{r['predicted_s']:>8.2f}s {100 * r['error']:>+6.1f}% {r['memory_gib']:>6.1f}GiB {'yes' if r['fits'] else 'NO'}")
    print(f"MAPE {100 * mape:.1f}% over {len(rows)} rows; every row fits: {all(r['fits'] for r in rows)}")
    print("\nValidation (not fitted to):")
    for v in validation:
        print(f"  {v['name']:<34} {v['class']:<9} {v['published_s']:>7.2f}s {v['predicted_s']:>7.2f}s "
              f"{100 * v['error']:>+6.1f}%")
    print(f"  MAPE {100 * summary['mape']:.1f}%, RMS {100 * summary['rms']:.1f}% over {len(validation)} runs; "
          f"{summary['inside_leave_one_out_band']} inside the band built from the other runs (leave-one-out)")


if __name__ == "__main__":
    main()
