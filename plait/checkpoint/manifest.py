"""A checkpoint's manifest: every file with its size and CRC32, written last, checked first.

A checkpoint may come from elsewhere, so a load trusts none of it: the manifest must list
exactly the folder's files that a load opens, each must match its size and checksum, and DCP's
metadata must unpickle as DCP metadata and nothing else (:mod:`.safe_dcp`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from plait.checkpoint.checksums import FileSum, file_crc32, file_sum
from plait.checkpoint.safe_dcp import METADATA_FILE, read_metadata_file
from plait.errors import CheckpointError

MANIFEST = "manifest.json"


def _files_under(folder: str) -> list[str]:
    """Every file below ``folder``, as paths relative to it."""
    return [os.path.relpath(os.path.join(root, name), folder)
            for root, _, names in os.walk(folder) for name in sorted(names)]


# What a load opens besides DCP's shards (*.distcp) and the per-rank state/ files: DCP's
# metadata, the resolved config and the tokenizer (the names plait.data.tokenizer saves).
# Other files in the folder (a README kept by `plait convert --force`) are never read.
READ_ON_LOAD = {METADATA_FILE, "config.toml", "tokenizer.json", "tokenizer.model"}


def _read_on_load(rel: str) -> bool:
    parts = rel.split(os.sep)
    return parts[-1] in READ_ON_LOAD or parts[-1].endswith(".distcp") or "state" in parts[:-1]


def write_manifest(folder: str, step: int, extra: dict[str, Any], known: dict[str, FileSum] | None = None) -> None:
    """Write the manifest of every file under ``folder``. ``known``: sums the writing ranks took
    as they wrote (path relative to ``folder``); only the other files are read back here."""
    known = known or {}
    files = {rel: file_sum(os.path.join(folder, rel), known.get(rel)) for rel in _files_under(folder)}
    manifest = {"step": step, "files": files, **extra}
    with open(os.path.join(folder, MANIFEST), "w") as fh:
        json.dump(manifest, fh, indent=1)


def _read_manifest(folder: str) -> dict[str, Any]:
    """The manifest of ``folder``, checked to be ``{"files": {path: {"bytes": int, "crc32":
    int}}, ...}``: anything else is a corrupt checkpoint (a caller falls back to an older one)."""
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint '{folder}' is incomplete: it has no {MANIFEST}")
    try:
        with open(manifest_path) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        raise CheckpointError(f"checkpoint '{folder}' is corrupt: {MANIFEST} cannot be read") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(_is_file_entry(entry) for entry in files.values()):
        raise CheckpointError(f"checkpoint '{folder}' is corrupt: {MANIFEST} is not a manifest "
                              '(it must map "files" to {path: {"bytes": N, "crc32": N}})')
    return manifest


def _is_file_entry(entry: Any) -> bool:
    return isinstance(entry, dict) and all(
        type(entry.get(key)) is int and entry[key] >= 0 for key in ("bytes", "crc32"))


def verify_checkpoint(folder: str) -> dict[str, Any]:
    """Check that the manifest lists exactly the files of ``folder``, each with its size and
    CRC32, and that DCP's metadata files unpickle as DCP metadata and nothing else.

    Returns the manifest; raises CheckpointError naming the first problem.
    """
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint '{folder}' does not exist")
    manifest = _read_manifest(folder)
    listed, present = set(manifest["files"]), set(_files_under(folder)) - {MANIFEST}
    if listed - present:
        raise CheckpointError(f"checkpoint '{folder}' is incomplete: '{min(listed - present)}' is missing")
    unlisted = {rel for rel in present - listed if _read_on_load(rel)}
    if unlisted:  # a file the save never wrote that a load would open: it would be read unchecked
        raise CheckpointError(f"checkpoint '{folder}' is corrupt: '{min(unlisted)}' is not in its {MANIFEST}")
    for rel, want in sorted(manifest["files"].items()):
        path = os.path.join(folder, rel)
        if os.path.getsize(path) != want["bytes"] or file_crc32(path) != want["crc32"]:
            raise CheckpointError(f"checkpoint '{folder}' is corrupt: '{rel}' does not match its checksum")
    for rel in sorted(listed):
        if os.path.basename(rel) == METADATA_FILE:
            read_metadata_file(os.path.join(folder, rel))
    return manifest
