"""``<run.dir>/events.jsonl``: one JSON object per line for every start, fault, restart,
resume, checkpoint and the end, from the ranks and the supervisor alike. Lines are written
with one ``write`` on a file opened for appending, which Linux keeps whole across processes."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

KINDS = ("start", "hang", "crash", "slow", "nan", "restart", "resume", "checkpoint", "done")


def events_path(run_dir: str) -> str:
    return os.path.join(run_dir, "events.jsonl")


def log_event(run_dir: str, kind: str, rank: int | None = None, pid: int | None = None,
              step: int | None = None, detail: str = "", **extra: Any) -> dict[str, Any]:
    """Append one event; returns it."""
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    event = {"time": time.time(), "kind": kind, "rank": rank, "pid": pid if pid is not None else os.getpid(),
             "host": socket.gethostname(), "step": step, "detail": detail, **extra}
    os.makedirs(run_dir, exist_ok=True)
    with open(events_path(run_dir), "a") as fh:
        fh.write(json.dumps(event) + "\n")
    return event


def read_events(run_dir: str) -> list[dict[str, Any]]:
    path = events_path(run_dir)
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
