"""Hugging Face interop: read and write ``config.json`` + safetensors folders, and ``plait convert``.

Supported architectures are Llama, Qwen2 and Mistral (``LlamaForCausalLM``,
``Qwen2ForCausalLM``, ``MistralForCausalLM``) and the mixture-of-experts Mixtral and Qwen2-MoE
(``MixtralForCausalLM``, ``Qwen2MoeForCausalLM``). Config fields and tensor names are mapped in
:mod:`plait.checkpoint.hf_mapping` (re-exported here), the MoE fields and expert tensors in
:mod:`plait.checkpoint.hf_moe`. RoPE in :mod:`plait.models.llama` already uses the rotate-half
layout of these checkpoints, so tensors are only renamed (and experts stacked), never permuted.
Weights are read with safetensors only, through :class:`plait.checkpoint.hf_source.HFWeights`;
pickled ``pytorch_model.bin`` files are refused.

Both directions of ``plait convert`` stream: HF -> plait holds one tensor in memory at a time,
plait -> HF one output shard, so a model larger than memory converts.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable

import torch
from safetensors.torch import save_file

from plait.checkpoint.atomic import atomic_folder
from plait.checkpoint.hf_mapping import (
    ARCHITECTURES,
    QWEN_ARCHITECTURES,
    _arch,
    _architecture_for,
    _default_architecture,
    config_from_hf,
    config_to_hf,
    placements,
    state_dict_from_hf,
    state_dict_to_hf,
)
from plait.checkpoint.hf_source import CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE, HFWeights, is_own_name
from plait.checkpoint.store import MANIFEST, model_checkpoint, read_model_tensors, save_model_checkpoint
from plait.config import JobConfig, ModelConfig, TrainConfig
from plait.errors import CheckpointError
from plait.models.llama import Llama, model_from_state

# Re-exported: the public HF interface is this module.
__all__ = [
    "ARCHITECTURES",
    "CONFIG_FILE",
    "INDEX_FILE",
    "WEIGHTS_FILE",
    "HFWeights",
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

# The most bytes of weights in one safetensors file plait writes: a larger model is written
# as shards with a model.safetensors.index.json, and writing holds one shard in memory.
SHARD_BYTES = 2 * 1024**3

# ---------------------------------------------------------------------------------------------
# folders


def from_pretrained(
    path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Llama:
    """Returns a plait ``Llama`` holding the Hugging Face checkpoint in folder ``path``.

    The model is built on the meta device and filled tensor by tensor from
    :class:`HFWeights`. Its ``hf_architecture`` attribute keeps the source model_type so
    :func:`save_pretrained` writes the same architecture back. Raises CheckpointError (one
    line naming the file) when the folder, config or weights are missing, corrupt or do not
    match, and PlaitError for an unsupported architecture.
    """
    weights = HFWeights(path)
    names = list(weights.placements)
    model = model_from_state(weights.cfg, {name: weights.read(name).to(device=device, dtype=dtype) for name in names})
    model.hf_architecture = weights.architecture
    return model


def save_pretrained(model: Llama, path: str, architecture: str | None = None) -> None:
    """Write ``config.json`` and the weights of ``model`` into folder ``path``: one
    ``model.safetensors``, or past :data:`SHARD_BYTES` shards listed in a
    ``model.safetensors.index.json``.

    Files are written in a temporary folder beside ``path`` first, so a failure leaves
    nothing half-written. Into an existing folder only plait's files are replaced: the weights
    and config, and the shards an earlier save's index lists are removed; the others (a
    tokenizer, a README) are kept. A shard name that is not a ``.safetensors`` file directly
    inside ``path`` raises CheckpointError before anything is written. ``architecture``
    defaults to ``model.hf_architecture`` if set, else to
    :func:`plait.checkpoint.hf_mapping._architecture_for` the model's config. Returns None.
    """
    sd = model.state_dict()
    arch = _arch(architecture or _default_architecture(model))
    fetch = lambda names: {name: sd[name].detach().to("cpu").contiguous() for name in names}  # noqa: E731
    _write_hf_folder(path, model.cfg, arch, model.tok_embeddings.weight.dtype, fetch)


def _write_hf_folder(
    path: str,
    cfg: ModelConfig,
    arch: str,
    dtype: torch.dtype,
    fetch: Callable[[list[str]], dict[str, torch.Tensor]],
) -> None:
    """:func:`save_pretrained` for a model of ``cfg`` whose weights (``dtype``) ``fetch(names)``
    returns a few at a time: one shard's plait parameters per call."""
    hf_config = config_to_hf(cfg, arch, dtype=dtype)
    places = placements(cfg, arch)
    groups = _shard_groups({name: math.prod(p.shape) * dtype.itemsize for name, p in places.items()})
    n = len(groups)
    files = [WEIGHTS_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    written = [*files, *([INDEX_FILE] if n > 1 else []), CONFIG_FILE]

    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"'{path}' exists and is not a folder")
    stale = _stale_shards(path)
    _refuse_folders_named(path, written)
    # Into an existing folder only our files are replaced (weights first, config last).
    with atomic_folder(path, merge=written) as tmp:
        weight_map: dict[str, str] = {}
        for file, names in zip(files, groups):
            tensors: dict[str, torch.Tensor] = {}
            for name, tensor in fetch(names).items():
                tensors.update(places[name].split(tensor))
            if arch in QWEN_ARCHITECTURES and not cfg.qkv_bias:  # Qwen always has q/k/v biases: write zeros
                for name, weight in list(tensors.items()):
                    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                        tensors[name.replace(".weight", ".bias")] = weight.new_zeros(weight.shape[0])
            save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file))
            del tensors  # before the next shard is fetched
        if n > 1:
            total = sum(math.prod(p.shape) for p in places.values()) * dtype.itemsize
            _write_json(os.path.join(tmp, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})
            _remove(os.path.join(path, WEIGHTS_FILE))  # left there, it would hide the index
        _write_json(os.path.join(tmp, CONFIG_FILE), hf_config)
    for name in [*([INDEX_FILE] if n == 1 else []), *stale]:
        if name not in files:
            _remove(os.path.join(path, name))


def _shard_groups(sizes: dict[str, int]) -> list[list[str]]:
    """The plait parameters of ``sizes`` (name -> bytes), in order, cut into shards of at most
    :data:`SHARD_BYTES` bytes; a larger parameter (all its experts) is a shard of its own."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _write_json(file: str, value: object) -> None:
    with open(file, "w", encoding="utf-8") as fh:
        json.dump(value, fh, indent=2)
        fh.write("\n")


def _remove(file: str) -> None:
    """Remove ``file`` if it is there; a link goes, never the file it points to."""
    if os.path.islink(file) or os.path.isfile(file):
        os.remove(file)


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
        if not is_own_name(name, ".safetensors"):
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
    """Write the Hugging Face folder ``src`` as a plait checkpoint to ``dst``, reading each
    tensor from :class:`HFWeights` only as DCP writes it (one tensor in memory at a time).

    The checkpoint is built in a uniquely named folder beside ``dst`` and renamed onto it (a
    new or empty ``dst``). Into a non-empty folder, as :func:`save_pretrained` does, only the
    checkpoint's files are replaced (its DCP shards, ``config.toml``, the manifest last) and
    the others are kept; :func:`convert` asks for ``--force`` first. Returns a one-line
    description."""
    weights = HFWeights(src)
    cfg = weights.cfg
    # A plait checkpoint carries a whole job config; the model section is what matters here.
    job = JobConfig(model=cfg, train=TrainConfig(seq_len=min(TrainConfig.seq_len, cfg.max_seq_len)))
    with torch.device("meta"):
        model = Llama(cfg)  # shapes and dtypes (float32, as from_pretrained loads) only
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise CheckpointError(f"'{dst}' exists and is not a folder")
    target = os.path.abspath(dst)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # Our own unique folder: save_model_checkpoint's fixed "<name>.tmp" lies inside it, so
    # no path a user may own (such as "DST.tmp") is ever cleared.
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.convert-", dir=os.path.dirname(target))
    try:
        built = os.path.join(staging, "checkpoint")
        save_model_checkpoint(model, job, built, source=weights)
        _publish_checkpoint(built, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    n = sum(p.numel() for p in model.parameters())
    return f"wrote plait checkpoint {dst} ({n:,} parameters) from {ARCHITECTURES[weights.architecture]} {src}"


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
    for name in os.listdir(dst):  # an older checkpoint's DCP files: unlisted, they fail the load
        if name.endswith(".distcp") and name not in files:
            _remove(os.path.join(dst, name))
    for name in files:
        os.makedirs(os.path.dirname(os.path.join(dst, name)), exist_ok=True)
        os.replace(os.path.join(built, name), os.path.join(dst, name))


def plait_to_hf(src: str, dst: str) -> str:
    """Write the plait checkpoint ``src`` as a Hugging Face folder to ``dst``
    (:func:`save_pretrained`: into a non-empty folder only plait's files are replaced), reading
    one output shard's tensors at a time. Returns a one-line description."""
    folder, job = model_checkpoint(src)
    with torch.device("meta"):
        meta = Llama(job.model).state_dict()  # shapes and dtypes only

    def fetch(names: list[str]) -> dict[str, torch.Tensor]:
        return read_model_tensors(folder, {name: torch.empty_like(meta[name], device="cpu") for name in names})

    arch = _architecture_for(job.model)
    _write_hf_folder(dst, job.model, arch, meta["tok_embeddings.weight"].dtype, fetch)
    n = sum(t.numel() for t in meta.values())
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
