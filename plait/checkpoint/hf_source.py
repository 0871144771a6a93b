"""A Hugging Face folder as a weight source: any block of any plait parameter, read alone.

A model built on the meta device and laid out for parallel training fills each rank's shards
by calling a *weight source* ``source(name, region)``: ``name`` a parameter of the unsharded
plait model, ``region`` one ``slice(start, stop)`` per dimension. :class:`HFWeights` is that
source for a folder of ``config.json`` and ``model.safetensors`` (or the shards a
``model.safetensors.index.json`` lists). Building one checks the whole folder from the
safetensors headers alone: the config, every tensor's name and shape, the shard files; a call
then reads only the bytes of its block, through safetensors slices. :func:`plait.checkpoint.hf
.from_pretrained` and ``plait convert`` read through it too, so there is one read path.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import torch
from safetensors import safe_open

from plait.checkpoint.hf_mapping import _hf_architecture, config_from_hf, placements_in
from plait.checkpoint.hf_placement import Placement, Region, whole
from plait.checkpoint.safe_dcp import one_line
from plait.checkpoint.store import check_same_weights
from plait.config import ModelConfig
from plait.errors import CheckpointError, PlaitError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class HFWeights:
    """The weights of the Hugging Face folder ``path``, as a weight source.

    ``cfg`` is the ModelConfig of its config.json and ``architecture`` its model_type
    ("llama", "qwen2_moe", ...). Construction raises CheckpointError (one line naming the file)
    when the folder, config, index or shards are missing, corrupt or do not match the config,
    and PlaitError for an unsupported architecture; it reads no tensor data.
    """

    def __init__(self, path: str):
        self.path = path
        self.architecture, self.cfg = read_model_config(path)
        shapes, self._file = _read_headers(path)
        self.placements: dict[str, Placement] = placements_in(
            shapes, self.cfg, self.architecture, where=f"'{path}'", origin=self._file
        )

    def __call__(self, name: str, region: Region) -> torch.Tensor:
        """The block ``region`` of plait parameter ``name``, a CPU tensor of exactly the
        region's shape in the checkpoint's dtype (the caller casts). Only the region's bytes
        are read: of stacked experts only those in the region, of a fused ``gate_up_proj``
        only the needed rows.

        Each call opens the files it reads and closes them before returning: a file's mapped
        pages count in the process's resident memory for as long as it stays open, so one
        handle kept over a whole load would grow to the size of the checkpoint."""
        place = self.placements.get(name)
        if place is None:
            raise KeyError(f"'{name}' is not a parameter of the model in '{self.path}'")
        region = _checked(region, place.shape, name)
        with contextlib.ExitStack() as stack:
            handles: dict[str, Any] = {}

            def tensor_of(hf_name: str) -> Any:
                file = self._file[hf_name]
                if file not in handles:
                    handles[file] = stack.enter_context(_opened(file))
                return handles[file].get_slice(hf_name)

            try:
                return place.read(region, tensor_of)
            except CheckpointError:
                raise
            except Exception as exc:  # the folder changed since it was checked
                raise CheckpointError(f"'{self.path}': reading {name} failed: {one_line(exc)}") from None

    def read(self, name: str) -> torch.Tensor:
        """All of plait parameter ``name`` (see :meth:`__call__`)."""
        return self(name, whole(self.placements[name].shape))

    def check_model(self, cfg: ModelConfig, what: str = "checkpoint.init_from") -> None:
        """Raise CheckpointError (``what``: the setting that named this folder) naming each
        field that decides the weights' names and shapes where ``cfg`` differs from this
        checkpoint's (``vocab_size = 0`` in ``cfg``: not resolved yet, accepted)."""
        check_same_weights(self.cfg, cfg, f"{what}: '{self.path}'")


def read_model_config(path: str) -> tuple[str, ModelConfig]:
    """(model_type, ModelConfig) of the folder ``path``'s config.json. Raises CheckpointError
    (one line naming the file) for a bad or missing config, PlaitError for an unsupported
    architecture or feature."""
    hf = _read_config(path)
    where = os.path.join(path, CONFIG_FILE)
    try:
        return _hf_architecture(hf), config_from_hf(hf)
    except KeyError as exc:
        raise CheckpointError(f"'{where}' lacks the field {exc}") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"'{where}' has an invalid value: {exc}") from None
    except PlaitError as exc:  # keep the class: a bad value is a CheckpointError
        raise type(exc)(f"'{where}': {exc}") from None


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


def is_own_name(name: object, suffix: str) -> bool:
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


def weight_files(path: str) -> dict[str, list[str] | None]:
    """Weight file -> the tensor names to read from it (None: all of them). Raises
    CheckpointError when there is none, or an index names a file outside the folder."""
    single, index = os.path.join(path, WEIGHTS_FILE), os.path.join(path, INDEX_FILE)
    if os.path.isfile(single):
        return {single: None}
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
            entries = list(weight_map.items())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"'{index}' is not a valid safetensors index: {exc}") from None
        files: dict[str, list[str] | None] = {}
        for name, shard in entries:
            if not is_own_name(shard, ".safetensors"):
                raise CheckpointError(
                    f"'{index}' lists the shard {shard!r} for {name}, which is not a .safetensors "
                    f"file inside '{path}'"
                )
            files.setdefault(os.path.join(path, shard), []).append(name)  # type: ignore[union-attr]
        return files
    pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
    hint = f" (found {pickles[0]}; plait loads only safetensors)" if pickles else ""
    raise CheckpointError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in '{path}'{hint}")


def _read_headers(path: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(HF tensor name -> shape, tensor name -> its file), from the safetensors headers: no
    tensor data is read."""
    shapes: dict[str, tuple[int, ...]] = {}
    origin: dict[str, str] = {}
    for file, names in weight_files(path).items():
        if not os.path.isfile(file):
            raise CheckpointError(f"weight shard '{file}' is missing")
        with _opened(file) as fh:
            if names is not None and (absent := sorted(set(names) - set(fh.keys()))):
                raise CheckpointError(f"'{file}' lacks {absent[0]}, which the index lists")
            for name in fh.keys() if names is None else names:
                shapes[name] = tuple(fh.get_slice(name).get_shape())
                origin[name] = file
    return shapes, origin


@contextlib.contextmanager
def _opened(file: str):
    """``safe_open(file)``, closed on leaving; a file safetensors refuses is a CheckpointError."""
    try:
        handle = safe_open(file, framework="pt")
    except Exception as exc:  # safetensors raises several types for a bad file
        raise CheckpointError(f"'{file}' is not a valid safetensors file: {one_line(exc)}") from None
    with handle:
        yield handle


def _checked(region: Region, shape: tuple[int, ...], name: str) -> Region:
    """``region`` as slices with int bounds inside ``shape``; raises ValueError (a caller's
    mistake) for the wrong number of dimensions, a step or bounds outside the tensor."""
    if len(region) != len(shape):
        raise ValueError(f"region {region} of {name} needs {len(shape)} slices for shape {shape}")
    out = []
    for piece, size in zip(region, shape):
        if not isinstance(piece, slice) or piece.step not in (None, 1):
            raise ValueError(f"region {region} of {name}: each entry must be a slice without a step")
        start = 0 if piece.start is None else piece.start
        stop = size if piece.stop is None else piece.stop
        if not 0 <= start <= stop <= size:
            raise ValueError(f"region {region} of {name} lies outside its shape {shape}")
        out.append(slice(start, stop))
    return tuple(out)

