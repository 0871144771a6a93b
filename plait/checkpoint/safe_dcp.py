"""Reading torch DCP checkpoints without running code from them.

A DCP checkpoint holds two kinds of pickles. Its ``.metadata`` file is a plain pickle of
:class:`~torch.distributed.checkpoint.metadata.Metadata`, which ``FileSystemReader`` opens
with ``pickle.load``; and every non-tensor value (the optimizer's ``param_groups``, for one)
is a ``torch.save`` blob that ``DefaultLoadPlanner`` opens with ``weights_only=False``. Both
run whatever a crafted file asks for. Checkpoints come from elsewhere (``plait generate``,
``plait convert``, ``checkpoint.init_from``, a shared run dir on ``--resume``), so plait opens
``.metadata`` with an unpickler that builds only the types a DCP metadata file holds, and the
non-tensor values with ``torch.load(weights_only=True)``. Anything else is refused with a
CheckpointError naming the file and what it asked for.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
from typing import IO, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from plait.errors import CheckpointError

METADATA_FILE = ".metadata"


def _layout_named(name: str) -> torch.layout:
    """Stands in for ``torch.serialization._get_layout``, which torch registers to pickle a
    ``torch.layout``: the layout called ``name`` ("torch.strided"), and nothing else."""
    layouts = {str(value): value for value in vars(torch).values() if isinstance(value, torch.layout)}
    if not isinstance(name, str) or name not in layouts:
        raise CheckpointError(f"unknown torch layout {name!r} in a DCP metadata file")
    return layouts[name]


# Every global a DCP .metadata pickle names, found by unpickling the .metadata files of plait's
# checkpoints (model-only; single-process, FSDP, ZeRO-1, DDP, TP, pipeline and DiLoCo training
# runs) with a find_class that logs: the metadata dataclasses, the file reader's per-item
# storage record, torch.Size, torch's layout lookup (answered by _layout_named) and the path
# type DCP keeps as the checkpoint id. Dtypes (torch.float32, ...) are checked by type in
# MetadataUnpickler.find_class.
ALLOWED_CLASSES: dict[tuple[str, str], Any] = {
    **{("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name) for name in (
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_filesystem._StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): _layout_named,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
}
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)  # pickled by name: torch.float32


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file, building no class outside :data:`ALLOWED_CLASSES`
    (and torch dtypes and layouts): a pickle that names ``os.system``, ``builtins.exec`` or any
    other callable is refused before it is called."""

    def __init__(self, file: IO[bytes], path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_CLASSES:
            return ALLOWED_CLASSES[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS):
            return getattr(torch, name)
        raise CheckpointError(f"checkpoint file '{self.path}' asks to unpickle '{module}.{name}', which a "
                              "DCP metadata file never holds; refusing to open it (it may run code)")

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"checkpoint file '{self.path}' holds a persistent id, which a DCP metadata "
                              "file never holds; refusing to open it")


def read_metadata_file(path: str) -> Metadata:
    """The DCP metadata in file ``path``, unpickled with :class:`MetadataUnpickler` and checked
    for the shape DCP relies on. Raises CheckpointError naming the file."""
    try:
        with open(path, "rb") as fh:
            metadata = MetadataUnpickler(fh, path).load()
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"checkpoint file '{path}' cannot be read: {exc.strerror}") from None
    except Exception as exc:  # a damaged pickle raises many kinds
        raise CheckpointError(f"checkpoint file '{path}' is corrupt: {type(exc).__name__}") from None
    _check_shape(metadata, path)
    return metadata


def _check_shape(metadata: Any, path: str) -> None:
    """DCP indexes these fields and opens the files named in ``storage_data``: each must be a
    file of the checkpoint folder itself, never a path that leads out of it."""

    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint file '{path}' is corrupt: {what}")

    if not isinstance(metadata, Metadata):
        raise corrupt(f"it holds a {type(metadata).__name__}, not DCP Metadata")
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(metadata.storage_data, dict):
        raise corrupt("its state_dict_metadata or storage_data is not a dict")
    if metadata.storage_meta is not None and not isinstance(metadata.storage_meta, StorageMeta):
        raise corrupt("its storage_meta is not DCP StorageMeta")
    for info in metadata.storage_data.values():
        if not isinstance(info, dcp_filesystem._StorageInfo):
            raise corrupt("an entry of storage_data is not a file record")
        name = info.relative_path
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise corrupt(f"it points at '{name}', outside the checkpoint folder")


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose ``read_metadata`` uses :func:`read_metadata_file` instead of
    ``pickle.load``; everything else (``storage_data``, the shard reads, which already use
    ``torch.load(weights_only=True)``) is torch's."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata_file(os.fspath(self._get_metadata_path(kwargs.get("rank"))))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that opens non-tensor values with ``torch.load(weights_only=True)``
    (torch's opens them with ``weights_only=False``)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"checkpoint value '{read_item.dest_index.fqn}' holds a pickled object "
                                  f"outside plain data; refusing to open it ({first})") from None
        # Hand torch's planner the value re-serialized from what the safe loader built: it holds
        # only plain data, so the planner's own torch.load has nothing left to run.
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


def load_state(state: dict[str, Any], folder: str, process_group: Any = None) -> None:
    """Collective: ``dcp.load`` of ``state`` from checkpoint ``folder`` through the safe reader
    and planner. Every failure ends as one CheckpointError line naming ``folder``."""
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(folder), planner=SafeLoadPlanner(),
                 process_group=process_group)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as exc:  # DCP raises many types; CheckpointException is a BaseException
        cause = first_failure(exc)
        if isinstance(cause, CheckpointError):
            raise CheckpointError(str(cause)) from None
        raise CheckpointError(f"checkpoint '{folder}' cannot be loaded: {one_line(cause)}") from None


def first_failure(exc: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException (which gathers every
    rank's failure with its traceback), or ``exc`` itself."""
    if isinstance(exc, CheckpointException) and exc.failures:
        failure = next(iter(exc.failures.values()))
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            return first_failure(inner)
    return exc


def one_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
