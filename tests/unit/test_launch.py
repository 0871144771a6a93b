"""plait.launch's share of cores per rank."""

from __future__ import annotations

import os

import pytest

from plait import launch


def test_usable_cores_follows_the_affinity_mask(monkeypatch):
    """taskset, Slurm's --cpus-per-task and container cpusets narrow the affinity mask, not
    os.cpu_count(): ranks must split the cores they may run on."""
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no affinity mask on this platform")
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert launch.usable_cores() == 3


def test_usable_cores_without_an_affinity_mask(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert launch.usable_cores() == 6
