"""Checks on every record the monitor reads from the store.

The store is open to any process that can reach its port (under torchrun it is torchrun's own
store), so a record under ``hb/<rank>`` or ``error/<rank>`` may be anything: not JSON, a
number, a heartbeat with a missing key or a key of the wrong type. The monitor must neither
crash on it nor act on it; these functions say what is wrong with a record, in one line, or
hand back the record in the shape the monitor relies on.
"""

from __future__ import annotations

import json
import math
from typing import Any

ERROR_CHARS = 2000  # a rank's error report is cut to this (plait/launch/ranks.py writes at most that)


class BadRecord(ValueError):
    """A store record that is not what the watchdog writes; the message says why."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and all(_number(v) for v in value)


# key -> (check, what it must be): the heartbeat the watchdog writes (plait/resilience/watchdog.py).
HEARTBEAT_KEYS = {
    "time": (_number, "a finite number (seconds since the epoch)"),
    "mono": (_number, "a finite number (the rank's monotonic clock)"),
    "pid": (lambda v: _integer(v) and v > 0, "a positive integer"),
    "host": (lambda v: isinstance(v, str), "a string"),
    "step": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "phase": (lambda v: isinstance(v, str), "a string"),
    "compute_s": (_numbers, "a list of finite numbers"),
    "step_s": (_numbers, "a list of finite numbers"),
    "nan_step": (lambda v: v is None or _integer(v), "null or an integer"),
}
COLLECTIVE_KEYS = {
    "op": (lambda v: isinstance(v, str), "a string"),
    "dim": (lambda v: isinstance(v, str), "a string"),
    "seq": (_integer, "an integer"),
    "since": (_number, "a finite number"),
}


def _check_keys(record: dict, keys: dict, where: str) -> None:
    for key, (ok, wanted) in keys.items():
        if key not in record:
            raise BadRecord(f"{where}: key '{key}' is missing")
        if not ok(record[key]):
            raise BadRecord(f"{where}: '{key}' is {record[key]!r:.60}; it must be {wanted}")


def parse_heartbeat(raw: bytes, rank: int, nproc: int) -> dict[str, Any]:
    """The heartbeat stored under ``hb/<rank>``, checked; raises BadRecord."""
    where = f"hb/{rank}"
    if not 0 <= rank < nproc:
        raise BadRecord(f"{where}: rank {rank} is outside 0..{nproc - 1}")
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRecord(f"{where}: not JSON ({exc})") from None
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: a JSON {type(record).__name__}, not an object")
    _check_keys(record, HEARTBEAT_KEYS, where)
    stage = record.setdefault("stage", 0)  # optional: a writer without pipeline stages leaves it out
    if not (_integer(stage) and stage >= 0):
        raise BadRecord(f"{where}: 'stage' is {stage!r:.60}; it must be an integer >= 0")
    if "rank" in record and record["rank"] != rank:
        raise BadRecord(f"{where}: says it is rank {record['rank']!r:.20}, not {rank}")
    collective = record.get("collective")
    if collective is not None:
        if not isinstance(collective, dict):
            raise BadRecord(f"{where}: 'collective' is {collective!r:.60}; it must be null or an object")
        _check_keys(collective, COLLECTIVE_KEYS, f"{where} collective")
    else:
        record["collective"] = None
    return record


def parse_error(raw: bytes) -> str:
    """A rank's error report under ``error/<rank>``: free text, decoded whatever its bytes."""
    if not isinstance(raw, (bytes, bytearray)):
        raise BadRecord(f"error report is a {type(raw).__name__}, not bytes")
    return bytes(raw[:4 * ERROR_CHARS]).decode("utf-8", errors="replace")[:ERROR_CHARS]
