"""bench/memory.py on short sequences: every mode runs on 2 ranks and the memory checks hold
(activation offload keeps <= 10% on the device, token-wise recompute lies between none and full
checkpointing monotonically, the planner within 15% of the offload modes' device and host
totals). One timed round is too noisy to order step times: BENCHMARKS.md has the full run."""

from __future__ import annotations

import json

from tests.e2e.bench_script import run_bench


def test_short_run_passes_the_memory_checks(tmp_path):
    path = tmp_path / "memory.json"
    proc = run_bench("memory.py", "--seq", "128", "--rounds", "1", "--no-time-check", "--out", str(path), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "(asserted)" in proc.stdout
    figures = json.loads(path.read_text())
    rows = figures["rows"]
    assert figures["failed"] == [] and set(rows) == {
        "none", "ac_full", "act_offload", "recompute_0.25", "recompute_0.5", "recompute_0.75",
        "offload_optimizer", "offload_params"}
    assert rows["act_offload"]["saved_host"] > 0 and rows["offload_params"]["host_peak"] > 0
    assert rows["none"]["host_peak"] == 0  # nothing is offloaded without an option
