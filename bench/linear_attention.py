"""Gated linear attention (GLA) against softmax attention: LASP-2 against ring attention under
context parallelism, and one process's training throughput (CPU, gloo).

Part A, ``--cp`` gloo ranks, one thread each: one block's token mixer (``block.attention``:
projections, the mixer core under cp, output projection), forward + backward, on one sequence
of each length in ``--lengths`` (batch 1). softmax runs ring attention over zigzag chunks,
GLA runs LASP-2 over contiguous chunks (the ``auto`` choices of ``parallel.cp_mode`` and
``parallel.cp_shard``). Same ``--dim`` and ``--heads`` for both (softmax head dim = dim / heads;
GLA d_k = dim / 2 / heads, d_v = dim / heads, plait's defaults). Each (length, mixer) runs a
warm-up, then ``--repeats`` timed runs; from ``--long-from`` tokens on, ``--repeats-long`` timed
runs and no warm-up. A run's time is the slowest rank's and the figure is the median over runs.
Bytes are what each rank sends on the cp dim (plait.telemetry.collectives), forward and
backward apart; memory is what autograd keeps for backward on a rank (saved-tensor hooks,
each storage once; the largest rank's). LASP-2's bytes are asserted to equal its formula
exactly at every length: forward (cp - 1) · heads · (d_k · d_v + d_k) · 4, backward
(cp - 1) · heads · d_k · d_v · 4.

Part B, one process, ``--threads`` torch threads: tokens/s of a forward + backward (cross
entropy on random tokens, no optimizer) of a GLA model and of the same-shape softmax model
(``--b-dim``, ``--b-layers``, ``--b-heads``, vocab ``--b-vocab``), one sequence of each length in
``--b-lengths``; a warm-up, then ``--b-rounds`` rounds alternating the two models (medians).

    .venv/bin/python bench/linear_attention.py [--quick] [--part A|B] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from plait.config import build_config, resolved_cp_shard
from plait.launch import spawn
from plait.models.llama import build_model
from plait.parallel.context_parallel import apply_context_parallel, sequence_layout
from plait.parallel.dims import ParallelDims
from plait.telemetry import collectives as comm

MIXERS = ("softmax", "gla")
FP32 = 4  # bytes per element: LASP-2's summaries travel in fp32, and the model is fp32


def layer_config(args: argparse.Namespace, mixer: str, seq: int, cp: int):
    """One block of ``mixer`` at ``seq`` tokens, cp over all ranks with the auto mode and split."""
    return build_config(values={
        "model.attention": mixer, "model.dim": args.dim, "model.n_heads": args.heads, "model.n_layers": 1,
        "model.ffn_dim": 4 * args.dim, "model.vocab_size": 256, "model.max_seq_len": seq,
        "train.seq_len": seq, "train.global_batch": 1, "train.micro_batch": 1,
        "parallel.nproc": cp, "parallel.cp": cp, "parallel.dp_shard": 1,
    })


def lasp2_bytes(cp: int, heads: int, d_k: int, d_v: int) -> tuple[int, int]:
    """LASP-2's wire bytes per layer and rank, forward and backward (batch 1, one piece per rank):
    an all-gather of each rank's (M, D) summary forward, of the entering-state gradients backward."""
    return (cp - 1) * heads * (d_k * d_v + d_k) * FP32, (cp - 1) * heads * d_k * d_v * FP32


def ring_bytes(cp: int, local: int, dim: int) -> tuple[int, int]:
    """Ring attention's wire bytes per layer and rank (tests/parallel/test_context_parallel.py):
    the other ranks' K and V forward; K, V again and their gradients backward."""
    kv = 2 * local * dim * FP32
    return (cp - 1) * kv, (2 * cp - 1) * kv


def local_rope(model, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of this rank's global positions, as ``Llama.forward`` makes them (batch 1)."""
    freqs = positions[None, :, None].float() * model.inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class SavedBytes:
    """Counts the bytes autograd keeps for backward (each storage once) while active."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def mixer_rank(args: argparse.Namespace) -> list[dict]:
    """On each cp rank: every (length, mixer)'s seconds per timed run and bytes per run."""
    torch.set_num_threads(1)  # spawn already gives 4 ranks on 2 cores one each; explicit here
    cp, rank = dist.get_world_size(), dist.get_rank()
    comm.install()
    dims = None
    rows = []
    for seq in args.lengths:
        for mixer in MIXERS:
            cfg = layer_config(args, mixer, seq, cp)
            if dims is None:  # the mesh does not depend on the mixer or the length
                dims = ParallelDims.from_config(cfg, cp)
                dims.build_mesh("cpu")
                comm.register_mesh(dims.mesh)
                comm.register_group(dims.cp_mesh.get_group(), "cp")
            model = build_model(cfg.model)
            apply_context_parallel(model, dims, cfg)
            mixer_module = model.layers["0"].attention
            layout = sequence_layout(cfg)
            hidden = torch.randn(1, seq, args.dim, generator=torch.Generator().manual_seed(seq))
            x = layout.shard(hidden, dims.cp_rank()).requires_grad_()
            cos, sin = local_rope(model, layout.token_index(dims.cp_rank(), seq))

            def run(saved: SavedBytes | None = None) -> tuple[float, int, int]:
                x.grad = None
                model.zero_grad(set_to_none=True)
                dist.barrier()  # on the world group: not counted on the cp dim
                comm.reset()
                start = time.perf_counter()
                with saved.hooks() if saved else contextlib.nullcontext():
                    out = mixer_module(x, cos, sin, None)
                forward = comm.step_summary()["comm_bytes"].get("cp", 0)
                out.sum().backward()
                seconds = time.perf_counter() - start
                return seconds, forward, comm.step_summary()["comm_bytes"].get("cp", 0)

            # The first run is a warm-up (first-call costs), except from --long-from tokens on:
            # the shorter lengths have warmed these processes, and a softmax run there takes minutes.
            long = seq >= args.long_from
            saved = SavedBytes()
            first = run(saved)  # the first run also counts the activations kept for backward
            if long:
                runs = [first] + [run() for _ in range(args.repeats_long - 1)]
            else:
                runs = [run() for _ in range(args.repeats)]
            rows.append({"seq": seq, "mixer": mixer, "shard": resolved_cp_shard(cfg), "rank": rank,
                         "seconds": [r[0] for r in runs], "forward": [r[1] for r in runs],
                         "backward": [r[2] for r in runs], "gla_dims": list(cfg.model.gla_dims()),
                         "saved": saved.total})
    return rows


def summarize_cp(args: argparse.Namespace, ranks: list[list[dict]]) -> list[dict]:
    """Per (length, mixer): median over runs of the slowest rank, bytes per rank (asserted
    equal on every rank and run), LASP-2's bytes checked against the formula."""
    cp = len(ranks)
    table = []
    for index, first in enumerate(ranks[0]):
        per_rank = [r[index] for r in ranks]
        slowest = [max(times) for times in zip(*(r["seconds"] for r in per_rank))]
        byte_counts = {(f, b) for r in per_rank for f, b in zip(r["forward"], r["backward"])}
        assert len(byte_counts) == 1, f"bytes differ between ranks or runs: {first['seq']} {first['mixer']}"
        forward, backward = byte_counts.pop()
        if first["mixer"] == "gla":  # exact: the summaries' size is fixed by the shapes
            want = lasp2_bytes(cp, args.heads, *first["gla_dims"])
            assert (forward, backward) == want, f"LASP-2 bytes {(forward, backward)} != formula {want}"
        else:  # reported beside the measured bytes, not asserted (tests/parallel checks it)
            want = ring_bytes(cp, first["seq"] // cp, args.dim)
        table.append({"seq": first["seq"], "mixer": first["mixer"], "shard": first["shard"],
                      "seconds": statistics.median(slowest), "seconds_runs": slowest,
                      "forward_bytes": forward, "backward_bytes": backward, "formula_bytes": list(want),
                      "saved": max(r["saved"] for r in per_rank)})
    gla_bytes = {(row["forward_bytes"], row["backward_bytes"]) for row in table if row["mixer"] == "gla"}
    assert len(gla_bytes) == 1, f"LASP-2 bytes depend on the length: {gla_bytes}"
    return table


def lm_config(args: argparse.Namespace, mixer: str, seq: int):
    return build_config(values={
        "model.attention": mixer, "model.dim": args.b_dim, "model.n_heads": args.b_heads,
        "model.n_layers": args.b_layers, "model.ffn_dim": 4 * args.b_dim, "model.vocab_size": args.b_vocab,
        "model.max_seq_len": seq, "train.seq_len": seq, "train.global_batch": 1, "train.micro_batch": 1,
        "parallel.nproc": 1,
    })


def throughput(args: argparse.Namespace) -> list[dict]:
    """Part B: tokens/s of forward + backward per model and length, in one process."""
    torch.set_num_threads(args.threads)
    table = []
    for seq in args.b_lengths:
        models = {mixer: build_model(lm_config(args, mixer, seq).model) for mixer in MIXERS}
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, args.b_vocab, (1, seq + 1), generator=gen)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]

        def step(mixer: str) -> float:
            model = models[mixer]
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            logits = model(inputs)
            F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
            return time.perf_counter() - start

        for mixer in MIXERS:
            step(mixer)  # warm-up
        seconds: dict[str, list[float]] = {mixer: [] for mixer in MIXERS}
        for _ in range(args.b_rounds):  # alternating: machine noise falls on both alike
            for mixer in MIXERS:
                seconds[mixer].append(step(mixer))
        params = {mixer: sum(p.numel() for p in model.parameters()) for mixer, model in models.items()}
        for mixer in MIXERS:
            median = statistics.median(seconds[mixer])
            table.append({"seq": seq, "mixer": mixer, "params": params[mixer], "seconds": median,
                          "seconds_runs": seconds[mixer], "tokens_per_s": seq / median})
    return table


def fmt_bytes(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:,.1f} MiB"
    return f"{n / 2**10:,.1f} KiB"


def print_cp_table(args: argparse.Namespace, cp_table: list[dict]) -> None:
    d_k, d_v = layer_config(args, "gla", 64, args.cp).model.gla_dims()
    print(f"\nA) one block's token mixer, forward + backward, cp = {args.cp} (gloo, 1 thread per rank), batch 1, "
          f"dim {args.dim}, {args.heads} heads (softmax head dim {args.dim // args.heads}; GLA d_k {d_k}, d_v {d_v})")
    print("| tokens | mixer (cp) | seconds (slowest rank) | forward bytes / rank | backward bytes / rank "
          "| saved for backward / rank |")
    print("|---|---|---|---|---|---|")
    by_key = {(row["seq"], row["mixer"]): row for row in cp_table}
    for seq in args.lengths:
        for mixer, label in (("softmax", "softmax (ring, zigzag)"), ("gla", "GLA (LASP-2, contiguous)")):
            row = by_key[seq, mixer]
            print(f"| {seq:,} | {label} | {row['seconds']:.3f} | {fmt_bytes(row['forward_bytes'])} | "
                  f"{fmt_bytes(row['backward_bytes'])} | {fmt_bytes(row['saved'])} |")
        ratio = {key: by_key[seq, "gla"][key] / by_key[seq, "softmax"][key]
                 for key in ("seconds", "forward_bytes", "backward_bytes", "saved")}
        print(f"| {seq:,} | GLA / softmax | {ratio['seconds']:.3f} | {ratio['forward_bytes']:.2e} | "
              f"{ratio['backward_bytes']:.2e} | {ratio['saved']:.2f} |")
    fwd, bwd = lasp2_bytes(args.cp, args.heads, d_k, d_v)
    print(f"LASP-2 bytes equal (cp-1)·heads·(d_k·d_v+d_k)·4 = {fwd:,} forward and (cp-1)·heads·d_k·d_v·4 = "
          f"{bwd:,} backward at every length (asserted).")


def print_one_process_table(args: argparse.Namespace, lm_table: list[dict]) -> None:
    gla_dims = lm_config(args, "gla", 64).model.gla_dims()
    print(f"\nB) one process, {args.threads} threads, forward + backward (cross entropy, no optimizer), batch 1: "
          f"dim {args.b_dim}, {args.b_layers} layers, {args.b_heads} heads, vocab {args.b_vocab} "
          f"(GLA d_k {gla_dims[0]}, d_v {gla_dims[1]})")
    print("| tokens | softmax tokens/s | GLA tokens/s | GLA / softmax |")
    print("|---|---|---|---|")
    rates = {(row["seq"], row["mixer"]): row["tokens_per_s"] for row in lm_table}
    for seq in args.b_lengths:
        soft, gla = rates[seq, "softmax"], rates[seq, "gla"]
        print(f"| {seq:,} | {soft:,.0f} | {gla:,.0f} | {gla / soft:.2f} |")
    params = {row["mixer"]: row["params"] for row in lm_table}
    print(f"parameters: softmax {params['softmax']:,}, GLA {params['gla']:,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("both", "A", "B"), default="both",
                        help="A: cp = 4, LASP-2 against ring; B: one process's tokens/s")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2k and 4k tokens, fewer repeats")
    parser.add_argument("--out", help="write every figure (and each run's seconds) to this JSON file")
    parser.add_argument("--cp", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--repeats-long", type=int, default=2)
    parser.add_argument("--long-from", type=int, default=131072,
                        help="lengths from here on: --repeats-long runs, the first timed (no warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--b-lengths", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--b-dim", type=int, default=256)
    parser.add_argument("--b-layers", type=int, default=4)
    parser.add_argument("--b-heads", type=int, default=4)
    parser.add_argument("--b-vocab", type=int, default=4096)
    parser.add_argument("--b-rounds", type=int, default=5)
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.b_lengths, args.repeats, args.b_rounds = [2048, 4096], [1024, 2048], 2, 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the spawned ranks; part B sets its own
    print("command:", "python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"machine: {os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}")

    # The machine is shared: the load before and after each part says whether a figure is clean.
    load = {"start": os.getloadavg()}
    figures: dict[str, list[dict]] = {}
    if args.part in ("both", "A"):
        start = time.perf_counter()
        figures["context_parallel"] = summarize_cp(args, spawn(mixer_rank, args.cp, (args,)))
        print_cp_table(args, figures["context_parallel"])
        load["after A"] = os.getloadavg()
        print(f"part A: {time.perf_counter() - start:.0f} s")
    if args.part in ("both", "B"):
        start = time.perf_counter()
        figures["one_process"] = throughput(args)
        print_one_process_table(args, figures["one_process"])
        load["after B"] = os.getloadavg()
        print(f"part B: {time.perf_counter() - start:.0f} s")
    print("load average (1, 5, 15 min): "
          + ", ".join(f"{when} {' '.join(f'{x:.2f}' for x in values)}" for when, values in load.items()))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"command": sys.argv, "torch": torch.__version__, "cores": os.cpu_count(), "args": vars(args),
                       "load_average": load, **figures}, fh, indent=1)

if __name__ == "__main__":
    main()
