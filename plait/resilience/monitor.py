"""The monitor: classifies a job's state from its ranks' heartbeats and processes (C4D-style).

In a data- or model-parallel job the ranks run the same collectives in the same order at the
same pace, so the rank that breaks the pattern is the faulty one:

- crash: a rank's process exited. Its peers then fail too (their collectives lose a member),
  so the culprit is a rank killed by a signal that had not reported a lost peer, else one
  whose failure was not a lost peer, else the first seen dead;
- hang, frozen: a rank's heartbeat stopped (SIGSTOP, a stuck interpreter);
- hang, no progress: ranks have waited in a collective for longer than the bound while
  others never entered it: those others are the culprits. If every rank waits, in the same
  collective, it is a communication hang; a rank waiting in a different collective than
  everyone else is the culprit;
- slow: a rank's compute per step (step time minus time blocked in collectives) has been
  ``slow_factor`` times the median of the other ranks of its pipeline stage for ``slow_steps``
  steps in a row, and the time its process waited for a CPU over those steps (a loaded
  machine) does not explain it. Stages do different work (the last one computes the output
  layer and the loss), so ranks are compared only within one; a stage of one rank has no
  peer to be slow against;
- nan: a rank's own loss (or gradient) was not finite; the culprits are the ranks where it
  appeared first.

The hang bound is max(``hang_s``, 3 x the median step time): ranks waiting longer than it
less two heartbeat intervals are reported, so the report lands within the bound.

A heartbeat older than max(2 s, 4 heartbeats) only raises the question whether the process is
frozen; the operating system answers it (plait/resilience/evidence.py). Stopped (SIGSTOP) or
gone: frozen, reported at that age as before. Runnable, or using CPU time: working (starved
on a loaded machine, or busy in a long C call such as a checkpoint save), never frozen; if
it never comes back its peers wait for it in their next collective and the stall check names
it. Asleep without using CPU time: frozen once that has lasted longer than the job's own
pauses, max(the hang bound, 2 x the longest checkpoint save seen). Where the OS cannot be
asked (no /proc, another host) the heartbeat's age decides, as before.

Every record read from the store is checked first (plait/resilience/records.py): a bad one
is reported once on stderr and ignored.
"""

from __future__ import annotations

import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from plait.config import ResilienceConfig
from plait.resilience.evidence import GONE, STOPPED, UNKNOWN, WORKING, ProcessWatch
from plait.resilience.records import BadRecord, parse_error, parse_heartbeat

SAVE_PHASE = "checkpoint"  # the heartbeat phase of a checkpoint save (plait/train/trainer.py)


@dataclass
class Fault:
    kind: str  # crash | hang | slow | nan
    ranks: list[int]
    step: int | None
    detail: str
    fatal: bool = True  # False: reported, the job goes on (a slow rank without evict_slow)
    extra: dict[str, Any] = field(default_factory=dict)


class Monitor:
    def __init__(self, store, nproc: int, cfg: ResilienceConfig, processes: ProcessWatch | None = None):
        self.store, self.nproc, self.cfg = store, nproc, cfg
        self.beats: dict[int, dict[str, Any]] = {}
        self.reported_slow: set[int] = set()
        self.reported_nan = False
        self.processes = processes or ProcessWatch()
        self.host = socket.gethostname()
        self.save_s: list[float] = []  # durations of the checkpoint saves seen, any rank
        self._save_began: dict[int, float] = {}  # rank -> its clock when its current save began
        self._reported_bad: set[str] = set()

    def _bad(self, key: str, problem: str) -> None:
        """Say once per key that a record is ignored: a foreign writer must not stop the job."""
        if key not in self._reported_bad:
            self._reported_bad.add(key)
            print(f"plait: monitor: ignoring a bad store record ({problem})", file=sys.stderr, flush=True)

    def read(self) -> None:
        for rank in range(self.nproc):
            key = f"hb/{rank}"
            if self.store.check([key]):
                try:
                    beat = parse_heartbeat(self.store.get(key), rank, self.nproc)
                except BadRecord as exc:
                    self._bad(key, str(exc))  # keep the last good heartbeat
                    continue
                self._note_save(rank, beat)
                self.beats[rank] = beat
                if beat["host"] == self.host:
                    self.processes.sample_wait(beat["pid"])

    def _note_save(self, rank: int, beat: dict[str, Any]) -> None:
        """Time checkpoint saves from the heartbeats' phases: a rank's next pause may be that long."""
        began = self._save_began.get(rank)
        if beat["phase"] == SAVE_PHASE and began is None:
            self._save_began[rank] = beat["mono"]
        elif beat["phase"] != SAVE_PHASE and began is not None:
            del self._save_began[rank]
            self.save_s = (self.save_s + [max(0.0, beat["mono"] - began)])[-16:]

    def error_of(self, rank: int) -> str:
        key = f"error/{rank}"
        if not self.store.check([key]):
            return ""
        try:
            return parse_error(self.store.get(key))
        except BadRecord as exc:
            self._bad(key, f"{key}: {exc}")
            return ""

    def step_time(self) -> float:
        """Median step wall time over every rank's recent steps (0 before the first)."""
        times = [t for beat in self.beats.values() for t in beat.get("step_s", [])]
        return statistics.median(times) if times else 0.0

    def hang_bound(self) -> float:
        return max(self.cfg.hang_s, 3 * self.step_time())

    def stale_s(self) -> float:
        """A heartbeat older than this asks whether the process is frozen."""
        return max(2.0, 4 * self.cfg.heartbeat_s)

    def idle_bound(self) -> float:
        """How long a process with a stale heartbeat may sleep without using CPU time."""
        return max(self.stale_s(), self.hang_bound(), 2 * max(self.save_s, default=0.0))

    def check(self, exitcodes: list[int | None]) -> Fault | None:
        """The first fault found now, or None. ``exitcodes``: each rank process's exit code
        (None while it runs)."""
        self.read()
        return (self._nan() or self._crash(exitcodes) or self._frozen() or self._stalled() or self._slow())

    def _step(self, rank: int) -> int | None:
        return self.beats.get(rank, {}).get("step")

    def _nan(self) -> Fault | None:
        steps = {r: b["nan_step"] for r, b in self.beats.items() if b.get("nan_step") is not None}
        if not steps or self.reported_nan:
            return None
        self.reported_nan = True
        first = min(steps.values())
        ranks = sorted(r for r, s in steps.items() if s == first)
        fatal = self.cfg.on_nan == "rollback"
        return Fault("nan", ranks, first, f"non-finite loss or gradient first on rank(s) {ranks} at step {first}",
                     fatal=fatal)

    def _crash(self, exitcodes: list[int | None]) -> Fault | None:
        dead = [r for r, code in enumerate(exitcodes) if code not in (None, 0)]
        if not dead:
            return None
        # A rank that reported a lost peer is collateral even if it then died by a signal:
        # gloo's teardown after a reset connection can abort the process (SIGABRT).
        lost_peer = {r for r in dead if "peer" in self.error_of(r).lower()}
        signalled = [r for r in dead if exitcodes[r] < 0 and r not in lost_peer]
        own = [r for r in dead if self.error_of(r) and r not in lost_peer]
        culprits = signalled or own or dead[:1]
        how = ", ".join(f"rank {r} exit code {exitcodes[r]}" for r in culprits)
        return Fault("crash", culprits, self._step(culprits[0]), f"process exited ({how})")

    def _evidence(self, rank: int) -> tuple[str, float]:
        """What the OS says of this rank's process (UNKNOWN where it runs on another host)."""
        beat = self.beats[rank]
        if beat["host"] != self.host:
            return UNKNOWN, 0.0
        return self.processes.look(beat["pid"])

    def _frozen(self) -> Fault | None:
        now = time.time()
        frozen: dict[int, str] = {}
        for rank, beat in sorted(self.beats.items()):
            # Looked at on every check, so that "no CPU time for N s" counts from early on.
            state, idle_s = self._evidence(rank)
            age = now - beat["time"]
            if age <= self.stale_s() or state == WORKING:
                continue
            if state in (STOPPED, GONE):
                frozen[rank] = f"no heartbeat for {age:.1f} s, process {state}"
            elif state == UNKNOWN:
                frozen[rank] = f"no heartbeat for {age:.1f} s (process frozen, e.g. SIGSTOP)"
            elif min(age, idle_s) > self.idle_bound():
                frozen[rank] = (f"no heartbeat for {age:.1f} s, process asleep with no CPU time for "
                                f"{min(age, idle_s):.1f} s (bound {self.idle_bound():.1f} s)")
        if not frozen:
            return None
        ranks = sorted(frozen)
        return Fault("hang", ranks, self._step(ranks[0]), "; ".join(f"rank {r}: {why}" for r, why in frozen.items()),
                     extra={"hang": "frozen"})

    def _stalled(self) -> Fault | None:
        if len(self.beats) < self.nproc:
            return None
        # Report within the bound: heartbeats arrive up to one interval late, polls another.
        bound = max(1.0, self.hang_bound() - 2 * self.cfg.heartbeat_s)
        inside = {r: b["collective"] for r, b in self.beats.items() if b.get("collective") is not None}
        waiting = {r: c for r, c in inside.items() if self.beats[r]["mono"] - c["since"] > bound}
        if not waiting:
            return None
        # A rank that has entered a collective has arrived, however recently (rank 0 often
        # arrives late after its logging): only ranks outside every collective are absent.
        kinds = {r: (c["op"], c["dim"]) for r, c in inside.items()}
        groups: dict[tuple, list[int]] = {}
        for rank, kind in kinds.items():
            groups.setdefault(kind, []).append(rank)
        if len(groups) > 1:
            # Ranks disagree: the smaller party, once it has waited past the bound too, sits in
            # a collective the others never joined (checked first: it also explains ranks not
            # seen in any collective). Until then the picture may still be settling.
            minority = sorted(min(groups.values(), key=len))
            if not all(r in waiting for r in minority):
                return None
            op, dim = kinds[minority[0]]
            return Fault("hang", minority, self._step(minority[0]),
                         f"rank(s) {minority} wait in {op} on '{dim}', which no other rank entered",
                         extra={"hang": "inside a stray collective"})
        (op, dim), ranks = next(iter(groups.items()))
        others = sorted(r for r in range(self.nproc) if r not in inside)
        if others:
            # Everyone else is stuck waiting for these ranks, which are somewhere else.
            phases = ", ".join(f"rank {r} in {self.beats[r]['phase']} of step {self.beats[r]['step']}" for r in others)
            return Fault("hang", others, self._step(others[0]),
                         f"ranks {sorted(waiting)} have waited {bound:.1f}+ s in {op} on '{dim}'; never entered by {phases}",
                         extra={"hang": "outside a collective"})
        return Fault("hang", [], self._step(ranks[0]),
                     f"communication hang: every rank has waited {bound:.1f}+ s in {op} on '{dim}'",
                     extra={"hang": "communication"})

    def _starved(self, rank: int, series: dict[int, list[float]]) -> bool:
        """Whether waiting for a CPU (more runnable processes than cores) explains the rank's
        slowness over its last ``slow_steps`` steps against its peers in ``series``: its
        process waited at least the extra compute, or waited so large a share of the time
        (1 - 1/slow_factor) that a slowdown of slow_factor is within what starvation alone
        does. Compute is a wall-clock difference, so on a starved machine it mostly measures
        who got a CPU when."""
        beat, n = self.beats[rank], self.cfg.slow_steps
        if beat["host"] != self.host:
            return False
        excess = sum(series[rank][-k] - statistics.median(series[o][-k] for o in series if o != rank)
                     for k in range(1, n + 1))
        window = sum(beat["step_s"][-n:]) + max(0.0, time.time() - beat["time"])
        waited = self.processes.run_wait(beat["pid"], window)
        return waited >= excess or waited >= (1 - 1 / self.cfg.slow_factor) * window

    def _slow(self) -> Fault | None:
        n = self.cfg.slow_steps
        if len(self.beats) < self.nproc or min(len(b.get("compute_s", [])) for b in self.beats.values()) < n:
            return None
        for rank, beat in self.beats.items():
            # Its peers: the ranks of its own pipeline stage, which do the same work per step.
            series = {r: b["compute_s"] for r, b in self.beats.items() if b.get("stage", 0) == beat.get("stage", 0)}
            if rank in self.reported_slow or len(series) < 2:
                continue
            own, ratios = series[rank], []
            for k in range(1, n + 1):
                others = [series[o][-k] for o in series if o != rank]
                ratios.append(own[-k] / max(statistics.median(others), 1e-9))
            if min(ratios) >= self.cfg.slow_factor and not self._starved(rank, series):
                self.reported_slow.add(rank)
                peers = "the others'" if len(series) == len(self.beats) else f"pipeline stage {beat['stage']}'s others'"
                return Fault("slow", [rank], self._step(rank),
                             f"compute per step {min(ratios):.2f}-{max(ratios):.2f}x {peers} median "
                             f"for the last {n} steps", fatal=self.cfg.evict_slow)
        return None
