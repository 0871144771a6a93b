"""What the live page shows, read from a run's files: the page never talks to the ranks.

- ``metrics.jsonl`` (rank 0, one record per logged step; plait/train/metrics.py), read
  incrementally: only the bytes appended since the last read are parsed, and a file that
  shrank or was replaced (a resumed run truncates the steps it will log again) is read anew;
- ``events.jsonl`` (starts, faults with their culprits, restarts, checkpoints, NaN skips);
- ``ranks.json`` (every rank's health from the monitor's verdicts; plait/resilience/health.py);
- ``pipeline.json`` (the latest step's pipeline timeline), ``config.toml``, ``summary.json``.

A client asks for what it lacks (``state(rows, events)``): the rows and events after those it
has, and the latest of everything else. Rows carry the scalar keys; the per-dimension and
per-expert tables of the latest record come whole in ``latest``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from plait.resilience.events import events_path
from plait.resilience.health import read_health
from plait.train.metrics import METRICS_FILE, PIPELINE_FILE, SUMMARY_FILE
from plait.train.trackers import scalars

CONFIG_FILE = "config.toml"


class JsonLines:
    """A JSON-lines file appended to by another process, parsed as it grows."""

    def __init__(self, path: str, slim=None):
        self.path, self.slim = path, slim or (lambda record: record)
        self.rows: list[dict[str, Any]] = []
        self.last: dict[str, Any] | None = None
        self.generation = 0  # counts the times the file started over
        self._offset, self._inode, self._pending = 0, None, b""

    def refresh(self) -> bool:
        """Read what was appended; True when the file was replaced or cut (rows start over)."""
        try:
            stat = os.stat(self.path)
        except OSError:
            stat = None
        if stat is None or stat.st_ino != self._inode or stat.st_size < self._offset:
            restarted = bool(self.rows)
            self.generation += restarted
            self.rows, self.last, self._offset, self._pending = [], None, 0, b""
            self._inode = stat.st_ino if stat else None
            if stat is None:
                return restarted
        else:
            restarted = False
        if stat.st_size == self._offset:
            return restarted
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read(stat.st_size - self._offset)
        except OSError:  # replaced between stat and open: the next refresh reads the new one
            return restarted
        self._offset += len(chunk)
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()  # a line still being written has no newline yet
        for line in lines:
            try:
                record = json.loads(line)
                row = self.slim(record) if isinstance(record, dict) else None
            except (ValueError, TypeError):  # not a record plait writes: skipped, the rest is read
                continue
            if row is not None:
                self.last = record
                self.rows.append(row)
        return restarted


def _slim(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics row for the charts: its numbers, and the largest MoE layer imbalance."""
    row = {"step": record.get("step"), "time": record.get("time"), **scalars(record)}
    moe = record.get("moe_load_imbalance")
    if isinstance(moe, list):
        row["moe_max_imbalance"] = max((v for v in moe if isinstance(v, (int, float))), default=None)
    return row


def _read_json(path: str) -> Any:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _run_info(run_dir: str) -> dict[str, Any]:
    """The few config values the page's header shows (``config.toml``, written at the start)."""
    try:
        with open(os.path.join(run_dir, CONFIG_FILE), "rb") as fh:
            cfg = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    section = lambda name: cfg.get(name, {}) if isinstance(cfg.get(name), dict) else {}  # noqa: E731
    parallel, model, train = section("parallel"), section("model"), section("train")
    return {"steps": train.get("steps"), "nproc": parallel.get("nproc"), "layout": _layout(parallel),
            "model": f"{model.get('n_layers')} layers × {model.get('dim')}", "lowbw": section("lowbw").get("method")}


def _layout(parallel: dict[str, Any]) -> str:
    """The degrees above 1, with ``dp_shard = -1`` (the rest of the ranks) resolved."""
    degree = lambda key: parallel.get(key) if isinstance(parallel.get(key), int) else 1  # noqa: E731
    nproc, replicate, shard = degree("nproc"), max(degree("dp_replicate"), 1), degree("dp_shard")
    if shard < 1:
        shard = max(nproc // max(degree("tp") * degree("pp") * degree("cp") * replicate, 1), 1)
    parts = [f"dp_replicate={replicate}"] if replicate > 1 else []
    parts += [f"dp_shard={shard} (ZeRO-{degree('zero')})"] if shard > 1 else []
    parts += [f"{key}={degree(key)}" for key in ("tp", "pp", "cp", "ep") if degree(key) > 1]
    return ", ".join(parts) or "single process"


class RunReader:
    """The live page's view of one run dir; safe to call from several request threads."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.metrics = JsonLines(os.path.join(run_dir, METRICS_FILE), _slim)
        self.events = JsonLines(events_path(run_dir))
        self._lock = threading.Lock()

    def state(self, have_rows: int = 0, have_events: int = 0, generation: int | None = None) -> dict[str, Any]:
        """Everything new for a client that holds ``have_rows`` rows and ``have_events`` events
        of the files' ``generation`` it was last told. ``rows_from`` says where the returned rows
        start: 0 for a client whose rows are of an older generation (the file started over since:
        a resumed run rewrites the steps it logs again) or that holds more than there are."""
        with self._lock:
            self.metrics.refresh()
            self.events.refresh()
            rows, events = self.metrics.rows, self.events.rows
            now_generation = self.metrics.generation + self.events.generation
            stale = generation is not None and generation != now_generation
            rows_from = 0 if stale or have_rows > len(rows) else have_rows
            events_from = 0 if stale or have_events > len(events) else have_events
            summary = _read_json(os.path.join(self.run_dir, SUMMARY_FILE))
            return {
                "now": time.time(), "run_dir": os.path.abspath(self.run_dir),
                "run": _run_info(self.run_dir), "finished": isinstance(summary, dict), "summary": summary,
                "generation": now_generation,
                "rows_from": rows_from, "rows": rows[rows_from:], "latest": self.metrics.last,
                "events_from": events_from, "events": events[events_from:],
                "health": read_health(self.run_dir),
                "pipeline": _read_json(os.path.join(self.run_dir, PIPELINE_FILE)),
            }
