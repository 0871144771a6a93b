"""Under torchrun, plait joins the given process group instead of spawning its own ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.e2e.test_bad_inputs import TINY
from tests.e2e.test_live_page import free_port
from tests.parallel.harness import write_corpus


def test_torchrun_two_ranks(tmp_path):
    corpus = write_corpus(str(tmp_path), n_docs=40)
    run_dir = tmp_path / "run"
    args = [*TINY, "--data.source", corpus, "--data.cache_dir", str(tmp_path / "cache"),
            "--run.dir", str(run_dir), "--train.steps", "3", "--parallel.nproc", "5",  # nproc ignored
            "--metrics.serve", str(port := free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "plait", "train", *args],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layout fsdp(2), 2 rank(s)" in proc.stdout
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["step"] > 0] == [1, 2, 3]
    assert os.path.isdir(run_dir / "checkpoints" / "step_000003")
    # Rank 0 served the live page; the torchrun monitor wrote the ranks' health for it.
    assert f"the live page is at http://127.0.0.1:{port}/" in proc.stdout
    health = json.load(open(run_dir / "ranks.json"))
    assert health["attempt"] == 0 and [(r["rank"], r["state"]) for r in health["ranks"]] == [(0, "done"), (1, "done")]
