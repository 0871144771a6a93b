"""Sharded, atomic, verified checkpoints (torch DCP) and the model-only checkpoint format.

A checkpoint is a folder ``<run.dir>/checkpoints/step_NNNNNN`` holding the DCP shards of the
model and optimizer, ``state/rank<r>.pt`` (scheduler, sampler position, RNG of each rank),
``config.toml`` (the resolved config), the tokenizer, and ``manifest.json`` listing every file
with its size and CRC32. It is written under ``step_NNNNNN.tmp`` and renamed only when every
rank has finished, then ``latest`` is replaced atomically: a crash mid-save leaves the
previous checkpoint whole and ``latest`` pointing at it; a failed save (a full disk) removes
its temp folder. Checkpoints are ordered by their step number, never by folder name.

A checkpoint may come from elsewhere, so loading trusts none of it: the manifest must list
exactly the folder's files, and DCP's pickles are opened by :mod:`.safe_dcp`, which runs no code.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.optim import ZeroRedundancyOptimizer

from plait.checkpoint.atomic import (
    atomic_folder,
    atomic_write,
    describe_write_error,
    fresh_folder,
    publish_folder,
    temp_folder_for,
)
from plait.checkpoint.checksums import FileSum, file_sum, no_record_crc32, summing_writer
from plait.checkpoint.manifest import MANIFEST, verify_checkpoint, write_manifest
from plait.checkpoint.pull_save import Source, save_pulled
from plait.checkpoint.safe_dcp import METADATA_FILE, first_failure, load_state, one_line, read_metadata_file
from plait.checkpoint.staging import ReusedStaging
from plait.config import JobConfig, ModelConfig, build_config, to_toml
from plait.errors import CheckpointError
from plait.parallel.zero import load_zero1_state_dict, zero1_state_dict
from plait.models.llama import build_model

# A single process saves and loads without a process group on purpose; DCP warns each time.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

LATEST = "latest"
_STEP_FOLDER = re.compile(r"step_(\d+)")


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _write_config(folder: str, cfg: JobConfig) -> None:
    with open(os.path.join(folder, "config.toml"), "w") as fh:
        fh.write(to_toml(cfg))


def _step_of(name: str) -> int | None:
    """The step of checkpoint folder ``name`` (``step_NNNNNN``), None for any other name."""
    match = _STEP_FOLDER.fullmatch(name)
    return int(match.group(1)) if match else None


def _checkpoints_by_step(root: str) -> list[str]:
    """Names of the finished checkpoint folders of ``root``, oldest step first: by number, as
    ``step_1000000`` is newer than ``step_999999`` though it sorts before it as text."""
    names = [n for n in os.listdir(root) if _step_of(n) is not None and os.path.isdir(os.path.join(root, n))]
    return sorted(names, key=_step_of)


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
    for name in reversed(_checkpoints_by_step(root)):
        folder = os.path.join(root, name)
        try:
            verify_checkpoint(folder)
            return folder
        except CheckpointError as exc:
            if skipped is not None:
                skipped.append(str(exc))
    return None


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, for_load: bool = False, flat: bool = True):
    """(model, optimizer) state dicts keyed by parameter name whatever the layout. ``flat``:
    the optimizer's param-group settings keyed by parameter name too; nested, they are keyed
    by group index, which every pipeline stage shares, so one stage's groups overwrote the
    others' in the checkpoint (checkpoints written before 2026-12-06 are nested)."""
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        return get_model_state_dict(model), zero1_state_dict(optimizer, model, for_load)
    return get_state_dict(model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=flat))


def _nested_param_groups(shards: str) -> bool:
    """Whether the checkpoint in ``shards`` keys its optimizer's param groups by index."""
    metadata = read_metadata_file(os.path.join(shards, METADATA_FILE))
    return any(re.match(r"optim\.param_groups\.\d+\.", key) for key in metadata.state_dict_metadata)


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


@dataclass
class StagedSave:
    """One training checkpoint's content, ready to write: what :func:`write_checkpoint` needs.
    Staged into a ``staging`` it owns every tensor, so training may go on while it is written."""

    run_dir: str
    step: int
    state: dict[str, Any]  # {"model": ..., "optim": ...}: this rank's DCP state dicts
    rank_state: dict[str, Any]
    cfg: JobConfig
    tokenizer: Any
    keep: int
    worker: tuple[str, Any] | None = None


def stage_checkpoint(run_dir: str, step: int, parts: list[nn.Module], optimizer: torch.optim.Optimizer,
                     rank_state: dict[str, Any], cfg: JobConfig, tokenizer: Any, keep: int,
                     worker: tuple[str, Any] | None = None, staging: ReusedStaging | None = None) -> StagedSave:
    """This rank's part of a save at ``step``. With ``staging`` the tensors are copied into its
    CPU buffers and ``rank_state`` deep-copied: the optimizer updates the parameters in place
    right after, and a background write must see this step's values."""
    model_sd, optim_sd = _state_dicts(merged_view(parts), optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if staging is not None:
        state = staging.stage(state)
        rank_state = deepcopy(rank_state)
    return StagedSave(run_dir, step, state, rank_state, cfg, tokenizer, keep, worker)


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
    after_shards: Callable[[], None] | None = None,
) -> str:
    """Collective: every rank calls it. Returns the final checkpoint folder.

    ``worker = (name, group)``: lowbw workers hold different weights and optimizer states,
    so each worker writes its own DCP checkpoint into the subfolder ``name`` over its own
    process group (DCP would otherwise keep one copy of what looks replicated).
    ``after_shards``: called once this rank's shards are written (fault injection)."""
    staged = stage_checkpoint(run_dir, step, parts, optimizer, rank_state, cfg, tokenizer, keep, worker)
    return write_checkpoint(staged, after_shards=after_shards)


def write_checkpoint(save: StagedSave, group: Any = None, after_shards: Callable[[], None] | None = None) -> str:
    """Collective over ``group`` (None: the world): write the staged ``save`` under
    ``step_NNNNNN.tmp``, agree that every rank's part succeeded, then rank 0 writes the
    manifest, publishes the folder and moves ``latest``. Returns the final folder; a failed
    save removes its temp folder and raises (a CheckpointError for a write error)."""
    root = checkpoint_root(save.run_dir)
    name = f"step_{save.step:06d}"
    final = os.path.join(root, name)
    tmp = temp_folder_for(final)
    rank = _rank()

    def prepare() -> None:
        if rank == 0:
            fresh_folder(tmp)
            os.makedirs(os.path.join(tmp, "state"))

    def write_shards() -> dict[str, FileSum]:
        """This rank's files, and their sums taken as they were written."""
        worker = save.worker
        folder, shard_group = (os.path.join(tmp, worker[0]), worker[1]) if worker else (tmp, group)
        writer, files = summing_writer(folder)
        with no_record_crc32():
            dcp.save(save.state, storage_writer=writer, process_group=shard_group)
        if after_shards is not None:
            after_shards()
        state_file = os.path.join(tmp, "state", f"rank{rank}.pt")
        torch.save(save.rank_state, state_file)
        return {**files.relative_sums(tmp), os.path.relpath(state_file, tmp): file_sum(state_file)}

    def publish(sums: list[dict[str, FileSum]]) -> None:
        if rank == 0:
            _write_config(tmp, save.cfg)
            if save.tokenizer is not None:
                save.tokenizer.save(tmp)
            world = dist.get_world_size() if dist.is_initialized() else 1
            write_manifest(tmp, save.step, {"world_size": world}, {k: v for part in sums for k, v in part.items()})
            publish_folder(tmp, final)
            with atomic_write(os.path.join(root, LATEST), "w") as fh:
                fh.write(name)
            _prune(root, save.keep, save.step)

    try:
        _on_every_rank(prepare, name, group)
        sums = _on_every_rank(write_shards, name, group)
        _on_every_rank(lambda: publish(sums), name, group)
    except BaseException as exc:
        if rank == 0:  # a full disk must not stay full of a save that failed
            shutil.rmtree(tmp, ignore_errors=True)
        cause = first_failure(exc)
        if not isinstance(cause, OSError):
            raise
        raise CheckpointError(f"checkpoint {name} was not saved: {describe_write_error(cause)}; "
                              "the partial save was removed") from None
    return final


def _on_every_rank(part: Callable[[], Any], name: str, group: Any = None) -> list[Any]:
    """Run this rank's ``part`` of a save, then agree with every rank that all succeeded (this
    is the save's barrier): a rank whose write failed alone would otherwise leave the others
    waiting forever in the next collective. Returns what ``part`` returned on each rank, in
    rank order (the agreement carries it). Raises this rank's error, or a CheckpointError
    when another rank failed. ``group``: the process group to agree on (None: the world)."""
    error: BaseException | None = None
    result: Any = None
    try:
        result = part()
    except (OSError, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
        error = exc
    outcomes = [(error is None, result)]
    if dist.is_initialized():
        outcomes = [None] * dist.get_world_size(group)
        dist.all_gather_object(outcomes, (error is None, result), group=group)
        if error is None and not all(ok for ok, _ in outcomes):
            raise CheckpointError(f"checkpoint {name} was not saved: another rank failed to write its part")
    if error is not None:
        raise error
    return [rank_result for _, rank_result in outcomes]


def _prune(root: str, keep: int, step: int) -> None:
    """Keep the ``keep`` newest checkpoints up to ``step`` (the one just written). Newer ones
    are left alone: they exist only when this run resumed before them, so they were skipped
    as damaged, and pruning by number would otherwise delete what was just written."""
    done = [n for n in _checkpoints_by_step(root) if _step_of(n) <= step]
    for name in done[:-keep]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_checkpoint(folder: str, parts: list[nn.Module], optimizer: torch.optim.Optimizer,
                    worker: tuple[str, Any] | None = None) -> dict[str, Any]:
    """Collective: load model and optimizer shards into the (already parallelized) objects
    (``worker``: this lowbw worker's subfolder and group, as saved).

    Returns this rank's saved state (``step``, ``scheduler``, ``loader``, ``rng``); when the
    world size changed, rank r falls back to rank 0's state (the data position is global).
    """
    model_cfg = getattr(parts[0], "cfg", None)
    if isinstance(model_cfg, ModelConfig):
        check_same_model(folder, model_cfg, "--resume")
    model = merged_view(parts)
    zero1 = isinstance(optimizer, ZeroRedundancyOptimizer)
    shards, group = (os.path.join(folder, worker[0]), worker[1]) if worker else (folder, None)
    if worker and not os.path.isdir(shards):
        raise CheckpointError(f"checkpoint '{folder}' has no weights for lowbw worker '{worker[0]}' "
                              "(saved with another lowbw.method or number of workers)")
    flat = zero1 or not _nested_param_groups(shards)
    model_sd, optim_sd = _state_dicts(model, optimizer, for_load=True, flat=flat)
    state = {"model": model_sd, "optim": {"state": optim_sd["state"]} if zero1 else optim_sd}
    load_state(state, shards, group)
    if zero1:
        set_model_state_dict(model, state["model"])
        load_zero1_state_dict(optimizer, model, state["optim"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(flatten_optimizer_state_dict=flat))
    path = os.path.join(folder, "state", f"rank{_rank()}.pt")
    if not os.path.isfile(path):
        path = os.path.join(folder, "state", "rank0.pt")
    try:
        return torch.load(path, weights_only=True)  # plain data and tensors only: runs no code
    except Exception as exc:  # a refused or damaged pickle
        raise CheckpointError(f"checkpoint file '{path}' cannot be loaded: {one_line(exc)}") from None


def save_model_checkpoint(model: nn.Module, cfg: JobConfig, dst: str, source: Source | None = None) -> None:
    """Single process: write a model-only checkpoint (DCP shards + config + manifest) to ``dst``
    atomically. ``plait generate`` and ``plait convert`` read it.

    With a weight ``source`` (``source(name, region)``, see :mod:`.hf_source`) the model may be
    on the meta device: each weight is read from the source as it is written, one at a time."""
    if os.path.exists(dst):
        raise CheckpointError(f"destination '{dst}' already exists; choose a new folder")
    try:
        with atomic_folder(dst, fixed_temp=True) as tmp:  # removed whatever happens
            if source is None:
                dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=tmp)
            else:
                save_pulled(model.state_dict(), source, tmp, "model")
            _write_config(tmp, cfg)
            write_manifest(tmp, 0, {"world_size": 1, "model_only": True})
    except (OSError, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
        cause = first_failure(exc)
        if not isinstance(cause, OSError):
            raise
        raise CheckpointError(f"checkpoint '{dst}' was not written: {describe_write_error(cause)}") from None


def model_checkpoint(src: str) -> tuple[str, JobConfig]:
    """(the checkpoint folder, its config) for ``src``: a checkpoint folder, or a run dir whose
    latest is taken; verified first (:func:`verify_checkpoint`)."""
    if os.path.isdir(checkpoint_root(src)) and not os.path.isfile(os.path.join(src, MANIFEST)):
        src = latest_checkpoint(src) or src
    verify_checkpoint(src)
    return src, build_config(os.path.join(src, "config.toml"))


def load_model_checkpoint(src: str, device: str = "cpu") -> tuple[nn.Module, JobConfig]:
    """Single process: verify ``src`` (a checkpoint folder, or a run dir whose latest is
    taken) and return the plain model with its weights and the checkpoint's config."""
    src, cfg = model_checkpoint(src)
    model = build_model(cfg.model, device=device, seed=cfg.train.seed)
    model.load_state_dict(_read_model_weights(model, src))
    return model, cfg


def read_model_tensors(folder: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill ``tensors`` (model parameter name -> a tensor of its shape) from the model weights
    of checkpoint ``folder``, reading only those: DCP reshards whatever layout saved them.
    Returns ``tensors``."""
    state = {"model": tensors}
    load_state(state, folder)
    return state["model"]


def _read_model_weights(model: nn.Module, folder: str) -> dict[str, Any]:
    """The model weights of checkpoint ``folder`` as a state dict shaped (and sharded) like
    ``model``'s: DCP reads each rank's shards of whatever layout saved them."""
    return read_model_tensors(folder, get_model_state_dict(model))


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
    check_same_model(src, model_cfg, "checkpoint.init_from")
    return src


def check_same_model(folder: str, model_cfg: ModelConfig, what: str) -> None:
    """Raise CheckpointError (``what``: the setting that named ``folder``) when the checkpoint's
    model differs from ``model_cfg`` in a field that decides the weights' names and shapes,
    naming each field: DCP would otherwise fail deep in loading with a traceback per rank."""
    saved = build_config(os.path.join(folder, "config.toml")).model
    check_same_weights(saved, model_cfg, f"{what}: '{folder}'")


def check_same_weights(saved: ModelConfig, model_cfg: ModelConfig, what: str) -> None:
    """Raise CheckpointError ``"<what> is a different model: ..."`` naming each of
    :data:`WEIGHT_FIELDS` where the checkpoint's config ``saved`` and ``model_cfg`` differ
    (``vocab_size = 0`` in ``model_cfg`` means not resolved yet, and matches)."""
    differ = [f"{name} {getattr(saved, name)} (checkpoint) vs {getattr(model_cfg, name)}"
              for name in WEIGHT_FIELDS if getattr(saved, name) != getattr(model_cfg, name)
              and not (name == "vocab_size" and model_cfg.vocab_size == 0)]  # 0: not resolved yet
    if differ:
        raise CheckpointError(f"{what} is a different model: " + "; ".join(differ))


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
