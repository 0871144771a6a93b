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


def test_fused_attention_kernel_is_refused_on_cuda(monkeypatch):
    """'fused' names CPU kernels: a job that will run on CUDA is refused with one line."""
    from plait.config import build_config
    from plait.errors import ConfigError
    from plait.launch import check_attention_kernel

    cfg = build_config(values={"model.attention_kernel": "fused", "train.device": "auto"})
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    check_attention_kernel(cfg)  # on the CPU: fine
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(ConfigError, match="model.attention_kernel = 'fused'"):
        check_attention_kernel(cfg)
    check_attention_kernel(build_config(values={"train.device": "auto"}))  # auto is fine on CUDA
