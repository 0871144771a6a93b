"""The monitor's classification on hand-made heartbeats, injection parsing, and the
checkpoint fallback (no processes: tests/parallel/test_resilience.py runs real faults)."""

from __future__ import annotations

import json
import os
import time

import pytest

from plait.config import ResilienceConfig
from plait.errors import ConfigError
from plait.resilience.inject import Injection, parse_injection
from plait.resilience.monitor import Monitor


class FakeStore:
    def __init__(self):
        self.data: dict[str, bytes] = {}

    def set(self, key, value):
        self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key):
        return self.data[key]

    def check(self, keys):
        return all(k in self.data for k in keys)


def beat(step=5, phase="forward", collective=None, waited=0.0, compute=(0.1, 0.1, 0.1), age=0.0, nan_step=None):
    now = time.time()
    mono = 1000.0
    c = None if collective is None else {"op": collective[0], "dim": collective[1], "seq": 7, "since": mono - waited}
    return {"time": now - age, "mono": mono, "pid": 1, "host": "h", "step": step, "phase": phase, "collective": c,
            "compute_s": list(compute), "step_s": [0.2] * len(compute), "nan_step": nan_step}


def monitor(beats: dict[int, dict], **cfg) -> Monitor:
    store = FakeStore()
    for rank, value in beats.items():
        store.set(f"hb/{rank}", json.dumps(value))
    return Monitor(store, len(beats), ResilienceConfig(**cfg))


def test_healthy_job_has_no_fault():
    beats = {r: beat(collective=("all_reduce", "dp"), waited=0.01) for r in range(4)}
    assert monitor(beats).check([None] * 4) is None


def test_crash_names_the_signalled_rank_not_its_failing_peers():
    m = monitor({r: beat() for r in range(4)})
    m.store.set("error/0", "RuntimeError: Connection closed by peer")
    fault = m.check([1, -9, None, 1])
    assert (fault.kind, fault.ranks) == ("crash", [1])


def test_a_peer_that_aborts_after_losing_its_connection_is_not_a_culprit():
    # Seen in CI: rank 1 was killed; rank 2's gloo read failed ("Connection reset by peer") and
    # its teardown then aborted (SIGABRT, -6) before the monitor looked.
    m = monitor({r: beat() for r in range(4)})
    m.store.set("error/2", "RuntimeError: Read error [127.0.0.1]:55987: Connection reset by peer")
    fault = m.check([None, -9, -6, None])
    assert (fault.kind, fault.ranks) == ("crash", [1])


def test_frozen_rank_stops_beating():
    beats = {r: beat() for r in range(4)}
    beats[2] = beat(age=3.0)
    fault = monitor(beats).check([None] * 4)
    assert (fault.kind, fault.ranks, fault.extra["hang"]) == ("hang", [2], "frozen")


def test_rank_missing_from_the_collective_everyone_waits_in():
    beats = {r: beat(collective=("all_reduce", "dp_shard"), waited=6.0) for r in range(4)}
    beats[1] = beat(phase="data", step=5)
    fault = monitor(beats).check([None] * 4)
    assert (fault.kind, fault.ranks, fault.extra["hang"]) == ("hang", [1], "outside a collective")


def test_rank_alone_in_a_stray_collective():
    beats = {r: beat(collective=("all_reduce", "dp_shard"), waited=6.0) for r in range(4)}
    beats[3] = beat(collective=("barrier", "other"), waited=6.0)
    fault = monitor(beats).check([None] * 4)
    assert (fault.kind, fault.ranks) == ("hang", [3])


def test_a_rank_that_just_entered_the_collective_has_arrived():
    """Rank 0 often reaches a collective late (it logs metrics): it is not the culprit."""
    beats = {r: beat(collective=("all_reduce", "dp_shard"), waited=6.0) for r in range(4)}
    beats[0] = beat(phase="data", collective=("all_reduce", "dp_shard"), waited=0.3)
    beats[2] = beat(phase="data")
    fault = monitor(beats).check([None] * 4)
    assert (fault.kind, fault.ranks) == ("hang", [2])


def test_everyone_stuck_in_one_collective_is_a_communication_hang():
    beats = {r: beat(collective=("all_gather", "tp"), waited=6.0) for r in range(4)}
    fault = monitor(beats).check([None] * 4)
    assert (fault.kind, fault.ranks, fault.extra["hang"]) == ("hang", [], "communication")


def test_waiting_below_the_bound_is_not_a_hang():
    beats = {r: beat(collective=("all_reduce", "dp_shard"), waited=2.0) for r in range(4)}
    beats[1] = beat(phase="data")
    assert monitor(beats).check([None] * 4) is None


def test_slow_rank_needs_consecutive_slow_steps():
    beats = {r: beat(compute=(0.1, 0.1, 0.1)) for r in range(4)}
    beats[2] = beat(compute=(0.1, 0.14, 0.14))  # 1.4x for only the last 2 steps
    assert monitor(beats, slow_steps=3).check([None] * 4) is None
    beats[2] = beat(compute=(0.14, 0.14, 0.14))
    fault = monitor(beats, slow_steps=3).check([None] * 4)
    assert (fault.kind, fault.ranks, fault.fatal) == ("slow", [2], False)
    assert monitor(beats, slow_steps=3, evict_slow=True).check([None] * 4).fatal


def test_pipeline_stages_are_compared_only_within_themselves():
    # pp 2 x dp 2: the last stage (output layer and loss) computes 3x what the first does.
    beats = {r: {**beat(compute=(0.1,) * 3 if r < 2 else (0.3,) * 3), "stage": r // 2} for r in range(4)}
    assert monitor(beats, slow_steps=3).check([None] * 4) is None
    beats[3] = {**beat(compute=(0.45,) * 3), "stage": 1}  # 1.5x its own stage's other rank
    fault = monitor(beats, slow_steps=3).check([None] * 4)
    assert (fault.kind, fault.ranks) == ("slow", [3])
    assert "pipeline stage 1's others' median" in fault.detail
    # One rank per stage (pp 4): no peer to be slow against.
    beats = {r: {**beat(compute=(0.1 * (r + 1),) * 3), "stage": r} for r in range(4)}
    assert monitor(beats, slow_steps=3).check([None] * 4) is None


def test_the_heartbeat_carries_the_pipeline_stage():
    from plait.resilience.records import parse_heartbeat
    from plait.resilience.watchdog import PROGRESS, Watchdog

    store = FakeStore()
    PROGRESS.reset()
    PROGRESS.stage = 2  # what StepGuard sets from the rank's pp coordinate
    Watchdog(store, 1, 0.5).beat()
    assert parse_heartbeat(store.get("hb/1"), 1, 4)["stage"] == 2
    PROGRESS.reset()
    assert parse_heartbeat(json.dumps(beat()).encode(), 0, 4)["stage"] == 0  # a writer without stages


def test_nan_names_the_ranks_where_it_appeared_first():
    beats = {r: beat() for r in range(4)}
    beats[1], beats[3] = beat(nan_step=6), beat(nan_step=5)
    fault = monitor(beats).check([None] * 4)
    assert (fault.kind, fault.ranks, fault.step, fault.fatal) == ("nan", [3], 5, True)
    assert monitor(beats, on_nan="skip").check([None] * 4).fatal is False


def test_parse_injection():
    assert parse_injection("") is None
    assert parse_injection("crash:rank=1:step=20") == Injection("crash", 1, 20)
    assert parse_injection("slow:rank=3:factor=2") == Injection("slow", 3, 1, 2.0)
    for bad in ("explode:rank=1", "crash:step=3", "crash:rank=x", "slow:rank=1:factor=0.5", "hang:rank=1:when=3"):
        with pytest.raises(ConfigError, match="resilience.inject"):
            parse_injection(bad)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    from plait.checkpoint.store import checkpoint_root, latest_good_checkpoint

    root = checkpoint_root(str(tmp_path))
    for step in (2, 4, 6):
        folder = os.path.join(root, f"step_{step:06d}")
        os.makedirs(folder)
        with open(os.path.join(folder, "shard.bin"), "wb") as fh:
            fh.write(b"x" * 100)
        import zlib

        manifest = {"step": step, "files": {"shard.bin": {"bytes": 100, "crc32": zlib.crc32(b"x" * 100)}}}
        with open(os.path.join(folder, "manifest.json"), "w") as fh:
            json.dump(manifest, fh)
    os.makedirs(os.path.join(root, "step_000008.tmp"))  # a save that died half way
    with open(os.path.join(root, "step_000006", "shard.bin"), "r+b") as fh:
        fh.seek(50)
        fh.write(b"y")  # a flipped byte
    os.truncate(os.path.join(root, "step_000004", "shard.bin"), 60)  # a truncated shard
    skipped: list[str] = []
    assert latest_good_checkpoint(str(tmp_path), skipped) == os.path.join(root, "step_000002")
    assert len(skipped) == 2 and "step_000006" in skipped[0] and "step_000004" in skipped[1]
    os.remove(os.path.join(root, "step_000002", "manifest.json"))  # a missing manifest
    assert latest_good_checkpoint(str(tmp_path)) is None
