"""A Hugging Face ``datasets`` folder (``Dataset.save_to_disk``) as a data source.

The folder holds ``state.json``, ``dataset_info.json`` and Arrow files, or, for a
``DatasetDict``, ``dataset_dict.json`` and one such folder per split (the ``train`` split is
read). ``datasets`` (the optional extra ``plait[datasets]``) opens it memory-mapped, offline:
nothing is downloaded and nothing is written outside plait's own caches. Workers read disjoint
row ranges, so no process holds the corpus.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from plait.data.pieces import Piece
from plait.errors import DataError

_ROWS_PER_READ = 1024  # rows converted to Python at once: bounded memory whatever the row count
SPLIT = "train"


def is_saved_dataset(source: str) -> bool:
    """Whether ``source`` is a folder written by ``save_to_disk`` (a Dataset or DatasetDict)."""
    path = Path(source).expanduser()
    return path.is_dir() and (
        (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    )


def _split_folder(source: str) -> Path:
    """The folder of the Dataset to read: ``source`` itself, or its ``train`` split."""
    path = Path(source).expanduser()
    if (path / "state.json").is_file():
        return path
    try:
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"data.source '{source}': dataset_dict.json is not a datasets split list") from None
    if SPLIT not in splits:
        raise DataError(
            f"data.source '{source}' is a DatasetDict without a '{SPLIT}' split (it has: "
            f"{', '.join(map(str, splits))}); point data.source at the split's folder"
        )
    return path / SPLIT


def open_dataset(source: str):
    """The ``datasets.Dataset`` saved at ``source``, memory-mapped; raises DataError."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never reach for the hub at run time
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data.source '{source}' is a Hugging Face datasets folder; run pip install 'plait[datasets]'"
        ) from None
    folder = _split_folder(source)
    try:
        return datasets.load_from_disk(str(folder), keep_in_memory=False)
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, ArrowInvalid ...
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"data.source '{source}' is not a readable datasets folder ({first})") from None


def files(source: str) -> list[Path]:
    """The dataset's files (for the source fingerprint), sorted."""
    folder = _split_folder(source)
    return sorted(p for p in folder.iterdir() if p.is_file())


def pieces(source: str, unit_bytes: int) -> list[Piece]:
    """Row ranges of about ``unit_bytes`` of data each, covering the dataset in order."""
    dataset = open_dataset(source)
    rows = len(dataset)
    size = sum(p.stat().st_size for p in files(source) if p.suffix == ".arrow")
    per_piece = max(1, rows * unit_bytes // max(size, 1))
    return [Piece("dataset", source, s, min(s + per_piece, rows)) for s in range(0, max(rows, 1), per_piece)]


def records(piece: Piece, field: str, hint: str) -> Iterator[tuple[str, Any]]:
    """``(where, value)`` of the ``field`` of rows ``[piece.start, piece.stop)``."""
    dataset = open_dataset(piece.path)
    if field not in dataset.column_names:
        raise DataError(
            f"data.source '{piece.path}' has no column '{field}' (columns: "
            f"{', '.join(dataset.column_names)}){hint}"
        )
    column = dataset.select_columns([field])
    for start in range(piece.start, piece.stop, _ROWS_PER_READ):
        stop = min(start + _ROWS_PER_READ, piece.stop)
        for offset, value in enumerate(column[start:stop][field]):
            if value is not None:
                yield f"data.source '{piece.path}' row {start + offset}", value
