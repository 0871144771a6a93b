"""bench/linear_attention.py on tiny lengths: both parts run, LASP-2's bytes pass the bench's own
assertion (its formula, the same at every length), and the ring's match its formula."""

from __future__ import annotations

import json

from tests.e2e.bench_script import run_bench


def test_tiny_run_reports_both_parts(tmp_path):
    path = tmp_path / "linear_attention.json"
    proc = run_bench("linear_attention.py", "--lengths", "512", "1024", "--repeats", "1", "--b-lengths", "256",
                     "--b-layers", "1", "--b-rounds", "1", "--out", str(path), timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "(asserted)" in proc.stdout
    figures = json.loads(path.read_text())
    rows = {(row["seq"], row["mixer"]): row for row in figures["context_parallel"]}
    assert set(rows) == {(seq, mixer) for seq in (512, 1024) for mixer in ("softmax", "gla")}
    for seq in (512, 1024):
        ring = rows[seq, "softmax"]
        assert ring["shard"] == "zigzag" and rows[seq, "gla"]["shard"] == "contiguous"
        assert [ring["forward_bytes"], ring["backward_bytes"]] == ring["formula_bytes"]
    assert all(row["tokens_per_s"] > 0 for row in figures["one_process"])
