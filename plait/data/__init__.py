"""Data pipeline: documents -> tokenizer -> token cache -> packed windows -> batches.

``prepare_data`` (:mod:`.prepare`) does everything up to the windows and caches each stage;
``train_loader`` picks the batching that ``data.batching`` names. The names below load on first
use, so a tokenization worker that imports :mod:`.token_cache` does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "BalancedLoader": "plait.data.balanced_loader",
    "DataBundle": "plait.data.prepare",
    "PackedWindows": "plait.data.packing",
    "StepLoader": "plait.data.loader",
    "StepSampler": "plait.data.loader",
    "StepStats": "plait.data.loader",
    "Tokenizer": "plait.data.tokenizer",
    "TokenizeReporter": "plait.data.prepare",
    "prepare_data": "plait.data.prepare",
    "split_documents": "plait.data.token_store",
    "train_loader": "plait.data.batching",
    "val_batches": "plait.data.loader",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'plait.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
