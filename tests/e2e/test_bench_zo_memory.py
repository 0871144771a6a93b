"""bench/zo_memory.py: a zeroth-order step of the demo model holds at most 10% more than a
forward pass (the weights perturbed in place, z regenerated one tensor at a time), far less
than a backpropagation step with AdamW."""

from __future__ import annotations

import json

from tests.e2e.bench_script import run_bench


def test_zo_step_peak_is_within_a_tenth_of_a_forward(tmp_path):
    path = tmp_path / "zo_memory.json"
    proc = run_bench("zo_memory.py", "--samples", "2", "--json", str(path), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    figures = json.loads(path.read_text())
    assert figures["weights"] < figures["forward"] <= figures["zo_step"] <= 1.10 * figures["forward"]
    assert figures["backprop_step"] > 3 * figures["zo_step"]
