"""Hugging Face interop: read and write ``config.json`` + safetensors folders, and ``plait convert``.

Supported architectures are Llama, Qwen2 and Mistral (``LlamaForCausalLM``,
``Qwen2ForCausalLM``, ``MistralForCausalLM``) and the mixture-of-experts Mixtral and Qwen2-MoE
(``MixtralForCausalLM``, ``Qwen2MoeForCausalLM``). Config fields and tensor names are mapped in
:mod:`plait.checkpoint.hf_mapping` (re-exported here), the MoE fields and expert tensors in
:mod:`plait.checkpoint.hf_moe`. RoPE in :mod:`plait.models.llama` already uses the rotate-half
layout of these checkpoints, so tensors are only renamed (and experts stacked), never permuted.
Weights are read with safetensors only; pickled ``pytorch_model.bin`` files are refused.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from plait.checkpoint.atomic import atomic_folder
from plait.checkpoint.hf_mapping import (
    ARCHITECTURES,
    QWEN_ARCHITECTURES,
    _arch,
    _default_architecture,
    _hf_architecture,
    config_from_hf,
    config_to_hf,
    state_dict_from_hf,
    state_dict_to_hf,
)
from plait.checkpoint.store import MANIFEST, load_model_checkpoint, save_model_checkpoint
from plait.config import JobConfig, TrainConfig
from plait.errors import CheckpointError, PlaitError
from plait.models.llama import Llama, rope_inv_freq

# Re-exported: the public HF interface is this module.
__all__ = [
    "ARCHITECTURES",
    "CONFIG_FILE",
    "INDEX_FILE",
    "WEIGHTS_FILE",
    "config_from_hf",
    "config_to_hf",
    "convert",
    "from_pretrained",
    "hf_to_plait",
    "is_hf_checkpoint",
    "plait_to_hf",
    "save_pretrained",
    "state_dict_from_hf",
    "state_dict_to_hf",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# ---------------------------------------------------------------------------------------------
# folders


def _read_config(path: str) -> dict[str, Any]:
    if not os.path.isdir(path):
        raise CheckpointError(f"Hugging Face checkpoint folder '{path}' does not exist")
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"'{file}' is missing; a Hugging Face checkpoint needs a config.json")
    try:
        with open(file, encoding="utf-8") as fh:
            hf = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"'{file}' is not valid JSON: {exc}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"'{file}' does not hold a JSON object")
    return hf


def _weight_files(path: str) -> dict[str, list[str] | None]:
    """Weight file -> the tensor names to read from it (None: all of them)."""
    single, index = os.path.join(path, WEIGHTS_FILE), os.path.join(path, INDEX_FILE)
    if os.path.isfile(single):
        return {single: None}
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"'{index}' is not a valid safetensors index: {exc}") from None
        files: dict[str, list[str] | None] = {}
        for name, shard in weight_map.items():
            files.setdefault(os.path.join(path, shard), []).append(name)  # type: ignore[union-attr]
        return files
    pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
    hint = f" (found {pickles[0]}; plait loads only safetensors)" if pickles else ""
    raise CheckpointError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in '{path}'{hint}")


def _load_tensors(
    path: str, device: str | torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Returns (HF-named tensors, tensor name -> the file it came from)."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for file, names in _weight_files(path).items():
        if not os.path.isfile(file):
            raise CheckpointError(f"weight shard '{file}' is missing")
        try:
            with safe_open(file, framework="pt", device=str(device)) as fh:
                if names is not None and (absent := sorted(set(names) - set(fh.keys()))):
                    raise CheckpointError(f"'{file}' lacks {absent[0]}, which the index lists")
                for name in fh.keys() if names is None else names:
                    tensors[name] = fh.get_tensor(name)
                    origin[name] = file
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises several types for a bad file
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"'{file}' is not a valid safetensors file: {reason}") from None
    return tensors, origin


def from_pretrained(
    path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Llama:
    """Returns a plait ``Llama`` holding the Hugging Face checkpoint in folder ``path``.

    The model's ``hf_architecture`` attribute keeps the source model_type so
    :func:`save_pretrained` writes the same architecture back. Raises CheckpointError (one
    line naming the file) when the folder, config or weights are missing, corrupt or do not
    match, and PlaitError for an unsupported architecture.
    """
    hf = _read_config(path)
    where = os.path.join(path, CONFIG_FILE)
    try:
        arch = _hf_architecture(hf)
        cfg = config_from_hf(hf)
    except KeyError as exc:
        raise CheckpointError(f"'{where}' lacks the field {exc}") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"'{where}' has an invalid value: {exc}") from None
    except PlaitError as exc:  # keep the class: a bad value is a CheckpointError
        raise type(exc)(f"'{where}': {exc}") from None
    tensors, origin = _load_tensors(path, device)
    sd = state_dict_from_hf(tensors, cfg, where=f"'{path}'", architecture=arch, origin=origin)
    with torch.device("meta"):
        model = Llama(cfg)
    model.load_state_dict({name: tensor.to(dtype) for name, tensor in sd.items()}, assign=True)
    model.inv_freq = rope_inv_freq(cfg).to(device)  # non-persistent buffer, fp32 like init
    model.hf_architecture = arch
    return model


def save_pretrained(model: Llama, path: str, architecture: str | None = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` for ``model`` into folder ``path``.

    Files are written in a temporary folder beside ``path`` first, so a failure leaves
    nothing half-written. Into an existing folder only plait's files are replaced: those two,
    and a sharded ``model.safetensors.index.json`` an earlier save left there is removed with
    the shards it lists; the others (a tokenizer, a README) are kept. A shard name that is not a
    ``.safetensors`` file directly inside ``path`` raises CheckpointError before anything is
    written. ``architecture`` defaults to ``model.hf_architecture`` if set, else to
    :func:`plait.checkpoint.hf_mapping._architecture_for` the model's config. Returns None.
    """
    cfg = model.cfg
    arch = _arch(architecture or _default_architecture(model))
    dtype = model.tok_embeddings.weight.dtype
    hf_config = config_to_hf(cfg, arch, dtype=dtype)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tensors = state_dict_to_hf(sd, cfg, arch)
    if arch in QWEN_ARCHITECTURES and not cfg.qkv_bias:  # Qwen always has q/k/v biases: write zeros
        for name, weight in list(tensors.items()):
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                tensors[name.replace(".weight", ".bias")] = weight.new_zeros(weight.shape[0])

    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"'{path}' exists and is not a folder")
    stale = _stale_shards(path)
    _refuse_folders_named(path, [WEIGHTS_FILE, CONFIG_FILE])
    # Into an existing folder only our two files are replaced (weights first, config last).
    with atomic_folder(path, merge=(WEIGHTS_FILE, CONFIG_FILE)) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as fh:
            json.dump(hf_config, fh, indent=2)
            fh.write("\n")
    for name in [INDEX_FILE, *stale]:
        stale_file = os.path.join(path, name)
        if os.path.islink(stale_file) or os.path.isfile(stale_file):
            os.remove(stale_file)  # a link goes, never the file it points to


def _is_own_name(name: object, suffix: str) -> bool:
    """True for a plain file name ending in ``suffix``: joined to a folder it names a file
    directly inside it, never one above or beside it."""
    return (
        isinstance(name, str)
        and name.endswith(suffix)
        and os.path.basename(name) == name
        and name not in (".", "..")
        and "\0" not in name
        and not (os.altsep and os.altsep in name)
    )


def _stale_shards(path: str) -> list[str]:
    """The shards a ``model.safetensors.index.json`` in folder ``path`` lists: the single
    weights file about to be written replaces them. An unreadable index lists none.

    Raises CheckpointError for a name that is not a ``.safetensors`` file directly inside
    ``path`` (``../victim``, an absolute path, a tokenizer): plait removes only shards."""
    index = os.path.join(path, INDEX_FILE)
    if not os.path.isfile(index):
        return []
    try:
        with open(index, encoding="utf-8") as fh:
            names = set(json.load(fh)["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    for name in sorted(names, key=str):
        if not _is_own_name(name, ".safetensors"):
            raise CheckpointError(
                f"'{index}' lists the shard {name!r}, which is not a .safetensors file inside "
                f"'{path}'; plait only removes shards there: remove the index yourself"
            )
    return sorted(names - {WEIGHTS_FILE})


def _refuse_folders_named(path: str, names: list[str]) -> None:
    """Raise CheckpointError when a file about to be written into folder ``path`` is a folder
    there: the write would fail half way."""
    for name in names:
        target = os.path.join(path, name)
        if os.path.isdir(target) and not os.path.islink(target):
            raise CheckpointError(f"'{target}' is a folder; plait would write a file there")


# ---------------------------------------------------------------------------------------------
# plait convert


def is_hf_checkpoint(path: str) -> bool:
    """True when folder ``path`` has a config.json naming ``architectures``."""
    try:
        with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as fh:
            hf = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(hf, dict) and bool(hf.get("architectures"))


def hf_to_plait(src: str, dst: str) -> str:
    """Load the Hugging Face folder ``src`` and write a plait checkpoint to ``dst``.

    The checkpoint is built in a uniquely named folder beside ``dst`` and renamed onto it (a
    new or empty ``dst``). Into a non-empty folder, as :func:`save_pretrained` does, only the
    checkpoint's files are replaced (its DCP shards, ``config.toml``, the manifest last) and
    the others are kept; :func:`convert` asks for ``--force`` first. Returns a one-line
    description."""
    model = from_pretrained(src)
    # A plait checkpoint carries a whole job config; the model section is what matters here.
    job = JobConfig(model=model.cfg, train=TrainConfig(seq_len=min(TrainConfig.seq_len, model.cfg.max_seq_len)))
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise CheckpointError(f"'{dst}' exists and is not a folder")
    target = os.path.abspath(dst)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # Our own unique folder: save_model_checkpoint's fixed "<name>.tmp" lies inside it, so
    # no path a user may own (such as "DST.tmp") is ever cleared.
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.convert-", dir=os.path.dirname(target))
    try:
        built = os.path.join(staging, "checkpoint")
        save_model_checkpoint(model, job, built)
        _publish_checkpoint(built, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    n = sum(p.numel() for p in model.parameters())
    arch = ARCHITECTURES[model.hf_architecture]
    return f"wrote plait checkpoint {dst} ({n:,} parameters) from {arch} {src}"


def _publish_checkpoint(built: str, dst: str) -> None:
    """Move the finished checkpoint folder ``built`` to ``dst``: one rename onto a new or empty
    folder, else file by file with the manifest removed first and written last, so a crash
    half way leaves a checkpoint that reads as incomplete. Other files of ``dst`` are kept."""
    if not os.path.lexists(dst) or (not os.path.islink(dst) and not os.listdir(dst)):
        os.replace(built, dst)  # rename(2) replaces an empty folder whole (a link: merged into)
        return
    files = sorted(
        os.path.relpath(os.path.join(root, name), built)
        for root, _, names in os.walk(built)
        for name in names
    )
    files = [name for name in files if name != MANIFEST] + [MANIFEST]
    _refuse_folders_named(dst, files)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(dst, MANIFEST))
    for name in files:
        os.makedirs(os.path.dirname(os.path.join(dst, name)), exist_ok=True)
        os.replace(os.path.join(built, name), os.path.join(dst, name))


def plait_to_hf(src: str, dst: str) -> str:
    """Load the plait checkpoint ``src`` and write a Hugging Face folder to ``dst``
    (:func:`save_pretrained`: into a non-empty folder only plait's files are replaced).
    Returns a one-line description."""
    model, _cfg = load_model_checkpoint(src)
    arch = _arch(_default_architecture(model))
    save_pretrained(model, dst, arch)
    n = sum(p.numel() for p in model.parameters())
    return f"wrote Hugging Face {ARCHITECTURES[arch]} folder {dst} ({n:,} parameters) from {src}"


def convert(src: str, dst: str, force: bool = False) -> str:
    """``plait convert SRC DST [--force]``: a Hugging Face folder becomes a plait checkpoint,
    and a plait checkpoint becomes a Hugging Face folder. Returns a one-line description of
    what was written.

    ``dst`` must be new or an empty folder; with ``force`` a non-empty folder is written into,
    replacing only the files plait writes there and keeping the others (a tokenizer, a README).
    A destination that is a file, not empty without ``force``, below a file or not writable, and
    any OS error while converting, raise CheckpointError (one line) and leave nothing
    half-written, not even the parent folders the write created.
    """
    if not os.path.exists(src):
        raise CheckpointError(f"'{src}' does not exist")
    created = _missing_parents(dst)
    try:
        _check_destination(dst, force)
        if is_hf_checkpoint(src):
            return hf_to_plait(src, dst)
        return plait_to_hf(src, dst)
    except BaseException as exc:
        for folder in created:  # deepest first; rmdir removes only what stayed empty
            try:
                os.rmdir(folder)
            except OSError:
                break
        if isinstance(exc, OSError):
            where = f" ('{exc.filename}')" if exc.filename else ""
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise CheckpointError(f"converting '{src}' to '{dst}' failed: {reason}{where}") from None
        raise


def _missing_parents(dst: str) -> list[str]:
    """The folders above ``dst`` that do not exist yet (deepest first): writing creates them."""
    missing = []
    folder = os.path.dirname(os.path.abspath(dst))
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def _check_destination(dst: str, force: bool) -> None:
    """Raise CheckpointError, before any weights are read, when ``dst`` cannot take a
    conversion: a file, a non-empty folder without ``force``, below a file, not writable."""
    target = os.path.abspath(dst)
    if os.path.lexists(target):
        if not os.path.isdir(target):
            raise CheckpointError(f"destination '{dst}' exists and is not a folder")
        if os.listdir(target) and not force:
            raise CheckpointError(
                f"destination '{dst}' already exists and is not empty; choose a new folder, or "
                "pass --force to replace plait's files there (weights, config) and keep the others"
            )
    ancestor = os.path.dirname(target)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise CheckpointError(f"destination '{dst}' cannot be created: '{ancestor}' is a file, not a folder")
    # The temporary folder goes beside dst, so its parent must be writable too. (os.access
    # answers yes to root on most file systems; the write itself is checked as well.)
    for folder in {ancestor, target} if os.path.isdir(target) else {ancestor}:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise CheckpointError(f"destination '{dst}' cannot be written: '{folder}' is read-only for this user")
