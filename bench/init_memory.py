"""Peak memory per rank right after initialization: sharded init on meta against the whole
model on every rank, for a Qwen2.5-0.5B-shaped model on 4 CPU ranks.

Each case spawns its ranks afresh and reads each rank's peak resident set (VmHWM) right after
the model is built and filled, before any step. The bound of the scale-ready-state issue is

    baseline + 1.1 × (fp32 weights / ranks + the largest single tensor)

where the baseline is the same script building a tiny model (torch, gloo, the mesh). Cases:

- ``fsdp4``: FSDP over 4 ranks (tied embeddings, the real Qwen2.5-0.5B: 494M parameters);
- ``pp4``, ``tp2_dp2``: pipeline over 4 stages, tensor parallel 2 × FSDP 2 (untied
  embeddings, 630M parameters: plait supports tied embeddings with neither);
- ``hf_fsdp4`` (``--hf``): FSDP over 4 ranks filled from a Hugging Face safetensors checkpoint
  of the tied model, written first into a temporary folder (2 GB);
- ``whole_*``: what every rank paid before, building the whole model then sharding it.

    .venv/bin/python bench/init_memory.py [--nproc 4] [--hf] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.distributed as dist

from plait.config import build_config
from plait.launch import spawn
from plait.models.llama import Llama, build_model, init_source
from plait.parallel.dims import ParallelDims
from plait.parallel.parallelize import parallelize_llama

QWEN = os.path.join(os.path.dirname(__file__), "..", "configs", "qwen2_5_0_5b.toml")
TINY = {"model.vocab_size": 512, "model.dim": 64, "model.n_layers": 4, "model.n_heads": 4, "model.n_kv_heads": 2,
        "model.ffn_dim": 128, "model.tie_embeddings": False}
UNTIED = {"model.tie_embeddings": False}
CASES = {
    "baseline": ({**TINY}, {}),
    "fsdp4": ({}, {}),
    "pp4": (UNTIED, {"parallel.pp": 4, "parallel.pp_schedule": "1f1b"}),
    "tp2_dp2": (UNTIED, {"parallel.tp": 2}),
    "whole_tied": ({}, {}),
    "whole_untied": (UNTIED, {}),
}


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def job(model: dict, parallel: dict, nproc: int):
    values = {"model.vocab_size": 151936, "train.seq_len": 512, "train.global_batch": 8, "train.micro_batch": 1,
              "train.dtype": "fp32", "train.device": "cpu", "parallel.nproc": nproc, **model, **parallel}
    return build_config(QWEN, values=values)


def build_case(name: str, model: dict, parallel: dict, hf_path: str | None) -> dict:
    """Inside a spawned rank: build the case's model, return this rank's peak and holdings."""
    torch.set_num_threads(1)
    world = dist.get_world_size()
    cfg = job(model, parallel, world)
    if name.startswith("whole"):
        built = [build_model(cfg.model, seed=cfg.train.seed)]  # the old way: everything everywhere
    else:
        dims = ParallelDims.from_config(cfg, world)
        dims.build_mesh("cpu")
        if hf_path:
            from plait.checkpoint.hf_source import HFWeights

            weights = HFWeights(hf_path)
        else:
            weights = init_source(cfg.model, cfg.train.seed)
        built, _ = parallelize_llama(cfg, dims, torch.device("cpu"), weights)
    peak = peak_rss_bytes()
    held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for m in built for p in m.parameters())
    dist.barrier()
    return {"peak": peak, "held": held}


def model_sizes(model: dict) -> tuple[int, int]:
    """(fp32 bytes of all weights, fp32 bytes of the largest tensor)."""
    cfg = job(model, {}, 1).model
    with torch.device("meta"):
        params = list(Llama(cfg).parameters())
    return sum(p.numel() for p in params) * 4, max(p.numel() for p in params) * 4


def write_hf_checkpoint(folder: str) -> None:
    from plait.checkpoint.hf import save_pretrained

    cfg = job({}, {}, 1).model
    save_pretrained(build_model(cfg, seed=0), folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--hf", action="store_true", help="also load a Hugging Face checkpoint into FSDP")
    parser.add_argument("--json", default="", help="write the figures to this file")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cases = dict(CASES)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_path = None
        if args.hf:
            hf_path = os.path.join(tmp, "qwen_hf")
            write_hf_checkpoint(hf_path)
            cases["hf_fsdp4"] = ({}, {})
        for name, (model, parallel) in cases.items():
            ranks = spawn(build_case, args.nproc, (name, model, parallel, hf_path if name.startswith("hf") else None))
            results[name] = {"peak": max(r["peak"] for r in ranks), "held": max(r["held"] for r in ranks)}
    baseline = results["baseline"]["peak"]
    gib = 2**30
    print(f"baseline (tiny model, {args.nproc} ranks): peak {baseline / gib:.2f} GiB per rank")
    print(f"{'case':<14}{'peak GiB':>10}{'held GiB':>10}{'bound GiB':>11}  within")
    for name, row in results.items():
        if name == "baseline":
            continue
        weights, largest = model_sizes(UNTIED if "untied" in name or name in ("pp4", "tp2_dp2") else {})
        bound = baseline + 1.1 * (weights / args.nproc + largest)
        row.update(bound=bound, weights=weights, largest=largest, within=row["peak"] <= bound)
        print(f"{name:<14}{row['peak'] / gib:>10.2f}{row['held'] / gib:>10.2f}{bound / gib:>11.2f}  "
              f"{'yes' if row['within'] else 'NO'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"nproc": args.nproc, "baseline": baseline, "cases": results}, fh, indent=2)


if __name__ == "__main__":
    main()
