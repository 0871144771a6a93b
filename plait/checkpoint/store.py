"""Sharded, atomic, verified checkpoints (torch DCP) and the model-only checkpoint format.

A checkpoint is a folder ``<run.dir>/checkpoints/step_NNNNNN`` holding the DCP shards of the
model and optimizer, ``state/rank<r>.pt`` (scheduler, sampler position, RNG of each rank),
``config.toml`` (the resolved config), the tokenizer, and ``manifest.json`` listing every file
with its size and CRC32. It is written under ``step_NNNNNN.tmp`` and renamed only when every
rank has finished, then ``latest`` is replaced atomically: a crash mid-save leaves the
previous checkpoint whole and ``latest`` pointing at it.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
import zlib
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.optim import ZeroRedundancyOptimizer

from plait.checkpoint.atomic import atomic_folder, atomic_write, fresh_folder, publish_folder, temp_folder_for
from plait.config import JobConfig, build_config, to_toml
from plait.errors import CheckpointError
from plait.parallel.zero import load_zero1_state_dict, zero1_state_dict
from plait.models.llama import build_model

# A single process saves and loads without a process group on purpose; DCP warns each time.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

MANIFEST = "manifest.json"
LATEST = "latest"


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_manifest(folder: str, step: int, extra: dict[str, Any]) -> None:
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            files[rel] = {"bytes": os.path.getsize(path), "crc32": _crc32(path)}
    manifest = {"step": step, "files": files, **extra}
    with open(os.path.join(folder, MANIFEST), "w") as fh:
        json.dump(manifest, fh, indent=1)


def _write_config(folder: str, cfg: JobConfig) -> None:
    with open(os.path.join(folder, "config.toml"), "w") as fh:
        fh.write(to_toml(cfg))


def verify_checkpoint(folder: str) -> dict[str, Any]:
    """Check that every file of the manifest is present with its size and CRC32.

    Returns the manifest; raises CheckpointError naming the first problem.
    """
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint '{folder}' does not exist")
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint '{folder}' is incomplete: it has no {MANIFEST}")
    try:
        with open(manifest_path) as fh:
            manifest = json.load(fh)
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint '{folder}' is corrupt: {MANIFEST} cannot be read") from None
    for rel, want in files.items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint '{folder}' is incomplete: '{rel}' is missing")
        if os.path.getsize(path) != want["bytes"] or _crc32(path) != want["crc32"]:
            raise CheckpointError(f"checkpoint '{folder}' is corrupt: '{rel}' does not match its checksum")
    return manifest


def latest_checkpoint(run_dir: str) -> str | None:
    """Path of the newest complete checkpoint of ``run_dir``, or None if there is none."""
    pointer = os.path.join(checkpoint_root(run_dir), LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as fh:
        name = fh.read().strip()
    return os.path.join(checkpoint_root(run_dir), name)


def latest_good_checkpoint(run_dir: str, skipped: list[str] | None = None) -> str | None:
    """The newest checkpoint of ``run_dir`` that passes ``verify_checkpoint``, or None.

    Newer ones that fail (a truncated shard, a flipped byte, a missing manifest) are passed
    over; their errors are appended to ``skipped`` when given. Half-written ``.tmp`` folders
    are never candidates.
    """
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return None
    names = sorted((n for n in os.listdir(root) if n.startswith("step_") and not n.endswith(".tmp")), reverse=True)
    for name in names:
        folder = os.path.join(root, name)
        try:
            verify_checkpoint(folder)
            return folder
        except CheckpointError as exc:
            if skipped is not None:
                skipped.append(str(exc))
    return None


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, for_load: bool = False):
    """(model, optimizer) state dicts keyed by parameter name whatever the layout."""
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        return get_model_state_dict(model), zero1_state_dict(optimizer, model, for_load)
    return get_state_dict(model, optimizer)


def merged_view(parts: list[nn.Module]) -> nn.Module:
    """One module over this rank's model parts (pipeline stages) with the full model's names,
    so state dicts have the same keys whatever the layout: checkpoints move between layouts."""
    if len(parts) == 1:
        return parts[0]
    view = nn.Module()
    view.layers = nn.ModuleDict()
    for part in parts:
        for name, block in part.layers.items():
            view.layers[name] = block
        for attr in ("tok_embeddings", "norm", "output"):
            if getattr(part, attr, None) is not None:
                setattr(view, attr, getattr(part, attr))
    return view


def save_checkpoint(
    run_dir: str,
    step: int,
    parts: list[nn.Module],
    optimizer: torch.optim.Optimizer,
    rank_state: dict[str, Any],
    cfg: JobConfig,
    tokenizer: Any,
    keep: int,
    worker: tuple[str, Any] | None = None,
) -> str:
    """Collective: every rank calls it. Returns the final checkpoint folder.

    ``worker = (name, group)``: lowbw workers hold different weights and optimizer states,
    so each worker writes its own DCP checkpoint into the subfolder ``name`` over its own
    process group (DCP would otherwise keep one copy of what looks replicated)."""
    root = checkpoint_root(run_dir)
    name = f"step_{step:06d}"
    final = os.path.join(root, name)
    tmp = temp_folder_for(final)
    rank = _rank()
    if rank == 0:
        fresh_folder(tmp)
        os.makedirs(os.path.join(tmp, "state"))
    _barrier()
    model_sd, optim_sd = _state_dicts(merged_view(parts), optimizer)
    folder, group = (os.path.join(tmp, worker[0]), worker[1]) if worker else (tmp, None)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder, process_group=group)
    torch.save(rank_state, os.path.join(tmp, "state", f"rank{rank}.pt"))
    _barrier()
    if rank == 0:
        _write_config(tmp, cfg)
        if tokenizer is not None:
            tokenizer.save(tmp)
        world = dist.get_world_size() if dist.is_initialized() else 1
        _write_manifest(tmp, step, {"world_size": world})
        publish_folder(tmp, final)
        with atomic_write(os.path.join(root, LATEST), "w") as fh:
            fh.write(name)
        _prune(root, keep)
    _barrier()
    return final


def _prune(root: str, keep: int) -> None:
    done = sorted(n for n in os.listdir(root) if n.startswith("step_") and not n.endswith(".tmp"))
    for name in done[:-keep]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_checkpoint(folder: str, parts: list[nn.Module], optimizer: torch.optim.Optimizer,
                    worker: tuple[str, Any] | None = None) -> dict[str, Any]:
    """Collective: load model and optimizer shards into the (already parallelized) objects
    (``worker``: this lowbw worker's subfolder and group, as saved).

    Returns this rank's saved state (``step``, ``scheduler``, ``loader``, ``rng``); when the
    world size changed, rank r falls back to rank 0's state (the data position is global).
    """
    model = merged_view(parts)
    zero1 = isinstance(optimizer, ZeroRedundancyOptimizer)
    model_sd, optim_sd = _state_dicts(model, optimizer, for_load=True)
    state = {"model": model_sd, "optim": {"state": optim_sd["state"]} if zero1 else optim_sd}
    shards, group = (os.path.join(folder, worker[0]), worker[1]) if worker else (folder, None)
    if worker and not os.path.isdir(shards):
        raise CheckpointError(f"checkpoint '{folder}' has no weights for lowbw worker '{worker[0]}' "
                              "(saved with another lowbw.method or number of workers)")
    try:
        dcp.load(state, checkpoint_id=shards, process_group=group)
    except Exception as exc:  # DCP raises many types for damaged shards
        raise CheckpointError(f"checkpoint '{folder}' cannot be loaded: {str(exc).splitlines()[0]}") from None
    if zero1:
        set_model_state_dict(model, state["model"])
        load_zero1_state_dict(optimizer, model, state["optim"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    path = os.path.join(folder, "state", f"rank{_rank()}.pt")
    if not os.path.isfile(path):
        path = os.path.join(folder, "state", "rank0.pt")
    return torch.load(path, weights_only=True)


def save_model_checkpoint(model: nn.Module, cfg: JobConfig, dst: str) -> None:
    """Single process: write a model-only checkpoint (DCP shards + config + manifest) to ``dst``
    atomically. ``plait generate`` and ``plait convert`` read it."""
    if os.path.exists(dst):
        raise CheckpointError(f"destination '{dst}' already exists; choose a new folder")
    with atomic_folder(dst, fixed_temp=True) as tmp:
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=tmp)
        _write_config(tmp, cfg)
        _write_manifest(tmp, 0, {"world_size": 1, "model_only": True})


def load_model_checkpoint(src: str, device: str = "cpu") -> tuple[nn.Module, JobConfig]:
    """Single process: verify ``src`` (a checkpoint folder, or a run dir whose latest is
    taken) and return the plain model with its weights and the checkpoint's config."""

    if os.path.isdir(checkpoint_root(src)) and not os.path.isfile(os.path.join(src, MANIFEST)):
        src = latest_checkpoint(src) or src
    verify_checkpoint(src)
    cfg = build_config(os.path.join(src, "config.toml"))
    model = build_model(cfg.model, device=device, seed=cfg.train.seed)
    model.load_state_dict(_read_model_weights(model, src))
    return model, cfg


def _read_model_weights(model: nn.Module, folder: str) -> dict[str, Any]:
    """The model weights of checkpoint ``folder`` as a state dict shaped (and sharded) like
    ``model``'s: DCP reads each rank's shards of whatever layout saved them."""
    state = {"model": get_model_state_dict(model)}
    try:
        dcp.load(state, checkpoint_id=folder)
    except Exception as exc:  # DCP raises many types for damaged shards
        raise CheckpointError(f"checkpoint '{folder}' cannot be loaded: {str(exc).splitlines()[0]}") from None
    return state["model"]


# Model fields that decide the weights' names and shapes: they must match to start from a
# checkpoint's weights (RoPE or epsilon may change, as when a model is fine-tuned longer).
WEIGHT_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "qkv_bias", "tie_embeddings",
                 "moe_experts", "moe_ffn_dim", "moe_shared_ffn_dim", "moe_shared_gate")


def initial_weights(src: str, model_cfg: Any) -> str:
    """``checkpoint.init_from``: the verified checkpoint folder ``src`` names (a run dir means
    its latest good checkpoint) after checking its model matches ``model_cfg``. Raises
    CheckpointError naming what is wrong."""
    if os.path.isdir(checkpoint_root(src)) and not os.path.isfile(os.path.join(src, MANIFEST)):
        folder = latest_good_checkpoint(src)
        if folder is None:
            raise CheckpointError(f"checkpoint.init_from: run dir '{src}' has no usable checkpoint")
        src = folder
    if not os.path.isdir(src):
        raise CheckpointError(f"checkpoint.init_from: '{src}' does not exist; give a checkpoint folder or a run dir")
    verify_checkpoint(src)
    if not os.path.isfile(os.path.join(src, ".metadata")):
        raise CheckpointError(f"checkpoint.init_from: '{src}' holds one set of weights per lowbw worker; "
                              "start from a checkpoint of a run with lowbw.method = 'none' or a model-only one")
    saved = build_config(os.path.join(src, "config.toml")).model
    differ = [f"{name} {getattr(saved, name)} (checkpoint) vs {getattr(model_cfg, name)}"
              for name in WEIGHT_FIELDS if getattr(saved, name) != getattr(model_cfg, name)
              and not (name == "vocab_size" and model_cfg.vocab_size == 0)]  # 0: not resolved yet
    if differ:
        raise CheckpointError(f"checkpoint.init_from: '{src}' is a different model: " + "; ".join(differ))
    return src


def load_model_weights(folder: str, parts: list[nn.Module]) -> None:
    """Collective: load only the model weights of checkpoint ``folder`` into the parallelized
    ``parts`` (any layout: DCP reshards); the optimizer, schedule and data position start fresh."""
    model = merged_view(parts)
    set_model_state_dict(model, _read_model_weights(model, folder))


def full_model_state(parts: list[nn.Module], pp_group=None) -> dict[str, torch.Tensor]:
    """Collective: the unsharded model state dict on CPU, complete on rank 0 only. With
    pipeline parallelism each stage's weights are gathered to rank 0 over the world."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=pp_group is None)
    state = get_model_state_dict(merged_view(parts), options=options)
    if pp_group is None:
        return state
    state = {k: v.cpu() for k, v in state.items()}
    gathered = [None] * dist.get_world_size() if _rank() == 0 else None
    dist.gather_object(state, gathered, dst=0)
    if _rank() != 0:
        return {}
    merged: dict[str, torch.Tensor] = {}
    for piece in gathered:
        merged.update(piece)
    return merged
