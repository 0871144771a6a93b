"""Length-balanced batching against naive in-order packing, on a long-tailed length mix (CPU).

Document lengths (tokens) come from a seeded log-normal clipped to [--min-len, --max-len], or
from --jsonl PATH (one JSON object a line; length = whitespace-split word count of --field).
Both methods see the same shuffled document order. Naive: concatenate, cut --seq-len windows,
deal them to ranks in order. Balanced: ``BalancedStream`` (plait/data/balance.py).

    .venv/bin/python bench/balance.py [--steps 50] [--ranks 8] [--micro 4] [--seq-len 16384]
        [--lookahead 2] [--model 8b|1b] [--jsonl PATH --field text] [--seed 0]

Columns, over the steps: imbalance = max/mean rank work per step (work = attention FLOPs
2*dim*s^2 per document + matmul FLOPs per token, per layer, see ``coefficients``); padding =
1 - tokens placed / (bins * seq_len). The last steps of a finite corpus are not counted for
either method if they are partial (only --steps full steps are run).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import time

from plait.data.balance import Assignment, BalancedStream, coefficients, naive

MODELS = {  # dim, n_layers, ffn_dim, n_heads, n_kv_heads
    "8b": (4096, 32, 14336, 32, 8),
    "1b": (2048, 16, 8192, 32, 8),
}


def lengths_from(args: argparse.Namespace) -> list[int]:
    if args.jsonl:
        with open(args.jsonl) as fh:
            return [max(1, len(str(json.loads(line).get(args.field, "")).split()))
                    for line in fh if line.strip()]
    rng = random.Random(args.seed)
    need = int(args.steps * 1.5 * args.ranks * args.micro * args.seq_len)  # tokens, with margin
    out: list[int] = []
    total = 0
    while total < need:
        n = int(min(args.max_len, max(args.min_len, rng.lognormvariate(args.mu, args.sigma))))
        out.append(n)
        total += n
    return out


def naive_steps(lengths: list[int], order: list[int], args, coefs) -> list[Assignment]:
    """In-order windows over the same shuffled order, leftover carried to the next step."""
    pool = [(d, 0, lengths[d]) for d in order]
    steps = []
    for _ in range(args.steps):
        a = naive([p[2] for p in pool], args.ranks, args.micro, args.seq_len, *coefs)
        # naive's leftover indexes into `pool`; map back to (doc, start) in the corpus.
        pool = [(pool[i][0], pool[i][1] + s, n) for i, s, n in a.leftover]
        steps.append(a)
    return steps


def summary(steps: list[Assignment]) -> tuple[float, float, float]:
    imb = [a.imbalance for a in steps]
    return statistics.mean(imb), max(imb), statistics.mean(a.padding_waste for a in steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--lookahead", type=float, nargs="+", default=[1.5, 2.0, 4.0])
    ap.add_argument("--model", choices=sorted(MODELS), default="8b")
    ap.add_argument("--jsonl", default=None)
    ap.add_argument("--field", default="text")
    ap.add_argument("--min-len", type=int, default=50)
    ap.add_argument("--max-len", type=int, default=16384)
    ap.add_argument("--mu", type=float, default=7.0, help="log-normal mu (median e^mu tokens)")
    ap.add_argument("--sigma", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print("$ " + shlex.join([".venv/bin/python", *sys.argv]))

    coefs = coefficients(*MODELS[args.model])
    lengths = lengths_from(args)
    print(f"{len(lengths)} documents, {sum(lengths)} tokens, length mean "
          f"{statistics.mean(lengths):.0f} median {statistics.median(lengths):.0f} max "
          f"{max(lengths)}; model {args.model}: attn/linear = {coefs[0] / coefs[1]:.3g} per "
          f"token (attention equals matmuls at s = {coefs[1] / coefs[0]:.0f})")
    print(f"{args.ranks} ranks x {args.micro} micro-batches x {args.seq_len} tokens, "
          f"{args.steps} steps")
    order = list(range(len(lengths)))
    random.Random(args.seed).shuffle(order)  # the same order BalancedStream draws

    rows = [("naive", *summary(naive_steps(lengths, order, args, coefs)), 0.0)]
    for la in args.lookahead:
        t0 = time.perf_counter()
        stream = BalancedStream(lengths, args.ranks, args.micro, args.seq_len, coefs,
                                seed=args.seed, lookahead=la)
        steps = [next(stream) for _ in range(args.steps)]
        ms = (time.perf_counter() - t0) / args.steps * 1e3
        rows.append((f"balanced lookahead={la:g}", *summary(steps), ms))
    print(f"{'method':<26}{'imbalance mean':>16}{'imbalance max':>15}{'padding mean':>14}"
          f"{'ms/step':>9}")
    for name, mean, mx, pad, ms in rows:
        print(f"{name:<26}{mean:>16.4f}{mx:>15.4f}{pad:>13.2%}{ms:>9.0f}")


if __name__ == "__main__":
    main()
