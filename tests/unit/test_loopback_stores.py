"""The stores of a local run (the supervisor's monitor store, rank 0's process-group store)
listen on 127.0.0.1 only: they are unauthenticated, and anyone who reaches one can abort
the job or forge heartbeats."""

from __future__ import annotations

import os

import pytest

from plait.config import build_config
from plait.launch.ranks import loopback_store
from plait.launch.supervisor import run_once
from plait.resilience.watchdog import MONITOR_ENV

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs /proc/net/tcp")

LOOPBACK = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it


def listening_addresses(port: int) -> list[str]:
    """The local addresses of the sockets listening on ``port``, as /proc/net/tcp{,6} write them."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.append(address)
    return found


def test_loopback_store_listens_on_loopback_only():
    store = loopback_store()
    assert listening_addresses(store.port) == [LOOPBACK]
    store.set("k", "v")
    assert store.get("k") == b"v"


def _store_listeners(cfg) -> dict[str, list[str]]:
    monitor_port = int(os.environ[MONITOR_ENV].rsplit(":", 1)[1])
    return {"process group": listening_addresses(int(os.environ["MASTER_PORT"])),
            "monitor": listening_addresses(monitor_port)}


def test_supervised_ranks_meet_in_stores_on_loopback_only(tmp_path):
    os.environ["OMP_NUM_THREADS"] = "1"
    cfg = build_config(None, [("parallel.nproc", "2"), ("run.dir", str(tmp_path / "run"))])
    outputs, fault = run_once(_store_listeners, cfg, 0, "gloo")
    assert fault is None
    assert outputs[1] == {"process group": [LOOPBACK], "monitor": [LOOPBACK]}
