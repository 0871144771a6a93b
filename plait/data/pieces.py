"""Units of a data source: what one tokenization worker reads alone (plait/data/sources.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """Part of one file (or dataset): ``kind`` says what ``start``/``stop`` count: bytes of a
    jsonl file, row groups of a parquet file, record batches of an arrow file, rows of a
    dataset; a whole text file or the demo ignores them."""

    kind: str
    path: str
    start: int = 0
    stop: int = 0


Unit = tuple[Piece, ...]  # pieces read one after another; a worker's whole task
