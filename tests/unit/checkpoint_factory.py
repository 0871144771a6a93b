"""Tiny real checkpoints for the checkpoint security and integrity tests (single process)."""

from __future__ import annotations

import json
import os
import zlib

import torch

from plait.checkpoint.store import MANIFEST, checkpoint_root, save_checkpoint, save_model_checkpoint
from plait.config import JobConfig, build_config
from plait.models.llama import build_model

TINY = {"model.vocab_size": 32, "model.dim": 16, "model.n_layers": 1, "model.n_heads": 2, "model.ffn_dim": 32,
        "model.max_seq_len": 16, "train.seq_len": 16}


def tiny_job(**changes) -> JobConfig:
    return build_config(values={**TINY, **changes})


def model_and_optimizer(cfg: JobConfig, seed: int = 0):
    """A tiny model and an AdamW that has taken one step (so it has moments to save)."""
    model = build_model(cfg.model, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def rank_state(step: int) -> dict:
    return {"step": step, "scheduler": {}, "loader": {}, "rng": torch.get_rng_state()}


def training_checkpoint(run_dir: str, step: int, cfg: JobConfig | None = None, keep: int = 3) -> str:
    """A training checkpoint (model, optimizer, rank state, config) of ``run_dir`` at ``step``."""
    cfg = cfg or tiny_job()
    model, optimizer = model_and_optimizer(cfg)
    return save_checkpoint(run_dir, step, [model], optimizer, rank_state(step), cfg, None, keep)


def model_checkpoint(dst: str, cfg: JobConfig | None = None) -> str:
    """A model-only checkpoint (what ``plait convert`` writes and ``plait generate`` reads)."""
    cfg = cfg or tiny_job()
    save_model_checkpoint(build_model(cfg.model, seed=0), cfg, dst)
    return dst


def rewrite_manifest_entry(folder: str, rel: str) -> None:
    """Record ``rel``'s current size and CRC32 in the manifest, as an attacker who replaced
    the file would, so the checksums pass and what follows must stop the file on its own."""
    path = os.path.join(folder, MANIFEST)
    with open(path) as fh:
        manifest = json.load(fh)
    with open(os.path.join(folder, rel), "rb") as fh:
        data = fh.read()
    manifest["files"][rel] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    with open(path, "w") as fh:
        json.dump(manifest, fh)


def step_folders(run_dir: str) -> list[str]:
    return sorted(os.listdir(checkpoint_root(run_dir)))
