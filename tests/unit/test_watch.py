"""The live page's pieces without a browser: the incremental reader of a run's files, the
read-only loopback server, the health file the monitor writes, and the trackers' keys."""

from __future__ import annotations

import http.client
import json
import os
import socket
from types import SimpleNamespace

import pytest
from hypothesis import given, settings, strategies as st

from plait.errors import UsageError
from plait.resilience.health import HealthWriter, read_health
from plait.resilience.monitor import Fault
from plait.train.trackers import scalars
from plait.watch.reader import JsonLines, RunReader
from plait.watch.server import PageServer, is_loopback, open_page


def write_rows(path, rows, mode="a"):
    with open(path, mode) as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


def test_json_lines_reads_only_what_was_appended(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = JsonLines(str(path))
    assert lines.refresh() is False and lines.rows == []  # no file yet
    write_rows(path, [{"step": 1}, {"step": 2}])
    lines.refresh()
    assert [r["step"] for r in lines.rows] == [1, 2]
    with open(path, "a") as fh:
        fh.write('{"step": 3, "lo')  # a line still being written
    lines.refresh()
    assert [r["step"] for r in lines.rows] == [1, 2]
    with open(path, "a") as fh:
        fh.write('ss": 1.5}\nnot json\n')
    lines.refresh()
    assert lines.rows[-1] == {"step": 3, "loss": 1.5} and len(lines.rows) == 3  # the bad line is skipped


def test_a_truncated_file_is_read_anew(tmp_path):
    """A resumed run rewrites metrics.jsonl without the steps it will log again."""
    path = tmp_path / "m.jsonl"
    lines = JsonLines(str(path))
    write_rows(path, [{"step": s} for s in range(1, 6)])
    assert lines.refresh() is False
    write_rows(path, [{"step": 1}, {"step": 2}], mode="w")
    assert lines.refresh() is True
    assert [r["step"] for r in lines.rows] == [1, 2]


def make_run(folder, steps=5):
    os.makedirs(folder, exist_ok=True)
    write_rows(os.path.join(folder, "metrics.jsonl"),
               [{"step": s, "time": 100.0 + s, "loss": 5.0 - s / 10, "comm_bytes": {"dp": 10 * s},
                 "comm_dim_s": {"dp": 0.01}, "moe_load_imbalance": [1.5, 2.5]} for s in range(1, steps + 1)])
    write_rows(os.path.join(folder, "events.jsonl"), [{"time": 1.0, "kind": "start", "rank": 0}])
    with open(os.path.join(folder, "config.toml"), "w") as fh:
        fh.write('[train]\nsteps = 100\n[parallel]\nnproc = 4\ndp_shard = -1\nzero = 1\ntp = 2\n[model]\nn_layers = 2\ndim = 64\n')
    return str(folder)


def test_reader_hands_a_client_what_it_lacks(tmp_path):
    reader = RunReader(make_run(tmp_path / "run"))
    first = reader.state()
    assert first["rows_from"] == 0 and [r["step"] for r in first["rows"]] == [1, 2, 3, 4, 5]
    # Rows carry the numbers; the per-dimension tables come whole in ``latest`` only.
    assert "comm_bytes" not in first["rows"][0] and first["latest"]["comm_bytes"] == {"dp": 50}
    assert first["rows"][0]["moe_max_imbalance"] == 2.5 and first["rows"][0]["time"] == 101.0
    assert first["run"]["layout"] == "dp_shard=2 (ZeRO-1), tp=2" and first["run"]["steps"] == 100
    assert first["health"] is None and first["pipeline"] is None and first["finished"] is False
    write_rows(tmp_path / "run" / "metrics.jsonl", [{"step": 6, "loss": 1.0}])
    later = reader.state(have_rows=5, have_events=1)
    assert later["rows_from"] == 5 and [r["step"] for r in later["rows"]] == [6] and later["events"] == []
    # A client that holds more rows than there are (the file started over) gets them all.
    assert reader.state(have_rows=99)["rows_from"] == 0


@pytest.fixture
def page(tmp_path):
    server = PageServer(make_run(tmp_path / "run"), "127.0.0.1", 0).start()
    yield server
    server.stop()


def request(server, path, method="GET", host=None):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    headers = {"Host": host} if host else {}
    conn.request(method, path, headers=headers)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response, body


def test_server_serves_the_page_and_the_state(page):
    response, body = request(page, "/")
    assert response.status == 200 and b'<script src="/app.js">' in body
    assert "default-src 'self'" in response.getheader("Content-Security-Policy")
    response, body = request(page, "/app.js")
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/javascript")
    response, body = request(page, "/api/state?rows=3&events=x")
    state = json.loads(body)
    assert response.status == 200 and state["rows_from"] == 3 and len(state["rows"]) == 2 and len(state["events"]) == 1


def test_server_is_read_only_and_names_no_file(page):
    for method in ("POST", "PUT", "DELETE"):
        assert request(page, "/api/state", method)[0].status == 501
    for path in ("/../metrics.jsonl", "/metrics.jsonl", "/%2e%2e/config.toml", "/assets/app.js"):
        assert request(page, path)[0].status == 404, path


def test_loopback_page_refuses_other_host_names(page):
    """DNS rebinding: a page on another site that resolves its name to 127.0.0.1 gets nothing."""
    assert request(page, "/api/state", host="evil.example:80")[0].status == 403
    assert request(page, "/api/state", host=f"localhost:{page.server_address[1]}")[0].status == 200
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


def test_a_nan_loss_reaches_the_browser_as_null(tmp_path):
    folder = make_run(tmp_path / "run")
    write_rows(os.path.join(folder, "metrics.jsonl"), [{"step": 6, "loss": float("nan")}])
    server = PageServer(folder, "127.0.0.1", 0).start()
    try:
        body = request(server, "/api/state")[1]
    finally:
        server.stop()
    assert b"NaN" not in body and json.loads(body)["rows"][-1]["loss"] is None


def test_a_port_in_use_is_one_usage_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"--port {port}: cannot listen on 127.0.0.1:{port}"):
            open_page(str(tmp_path), "127.0.0.1", port, f"--port {port}")


class FakeMonitor:
    def __init__(self, beats, nproc=4):
        self.beats, self.nproc = beats, nproc

    def hang_bound(self):
        return 5.0

    def stale_s(self):
        return 2.0


def beat(step, collective=None):
    return {"pid": 100 + step, "host": "h", "step": step, "phase": "forward", "time": 0.0, "mono": 0.0,
            "step_s": [0.1], "compute_s": [0.08], "collective": collective}


def states(run_dir):
    return [r["state"] for r in read_health(run_dir)["ranks"]]


def test_health_rows_follow_the_monitors_verdicts(tmp_path):
    run_dir = str(tmp_path)
    monitor = FakeMonitor({0: beat(3), 1: beat(3, {"op": "all_reduce", "dim": "dp"}), 2: beat(3)})
    writer = HealthWriter(run_dir, monitor, attempt=0)
    writer.update([None] * 4, force=True)
    assert states(run_dir) == ["healthy", "healthy", "healthy", "starting"]
    writer.update([None] * 4, Fault("slow", [2], 3, "compute per step 2x the others' median", fatal=False))
    assert states(run_dir) == ["healthy", "healthy", "slow", "starting"]
    assert read_health(run_dir)["ranks"][1]["collective"] == "all_reduce on dp"
    writer.update([None] * 4, Fault("hang", [1], 3, "rank 1: no heartbeat for 2.5 s, process stopped"))
    health = read_health(run_dir)  # a verdict is written at once, not at the next tick
    assert states(run_dir)[1] == "hung" and "rank 1" in health["ranks"][1]["detail"]
    writer.stopped_by = [1]
    writer.update([-9] * 4, force=True)
    assert states(run_dir) == ["stopped", "hung", "stopped", "stopped"]
    beats: dict = {}
    restarted = HealthWriter(run_dir, FakeMonitor(beats), attempt=1)
    restarted.update([None] * 4, force=True)  # until the ranks beat again, the verdict stays
    assert states(run_dir) == ["stopped", "hung", "stopped", "stopped"]
    assert "restarting (attempt 1)" in read_health(run_dir)["ranks"][1]["detail"]
    beats.update({r: beat(5) for r in range(4)})
    restarted.update([None, None, None, 0], force=True)
    assert states(run_dir) == ["restarted", "restarted", "restarted", "done"]
    restarted.update([None, 1, None, 0], force=True)
    assert states(run_dir)[1] == "crashed" and read_health(run_dir)["attempt"] == 1


def test_a_skipped_nan_step_does_not_mark_the_rank(tmp_path):
    writer = HealthWriter(str(tmp_path), FakeMonitor({0: beat(1)}, nproc=1), attempt=0)
    writer.update([None], Fault("nan", [0], 1, "non-finite loss", fatal=False))
    assert states(str(tmp_path)) == ["healthy"]
    writer.update([None], Fault("nan", [0], 1, "non-finite loss"))  # on_nan = rollback: fatal
    assert states(str(tmp_path)) == ["nan"]


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8),
                       st.one_of(st.integers(), st.floats(allow_nan=True), st.booleans(), st.text(max_size=4),
                                 st.lists(st.integers(), max_size=3), st.none())))
def test_trackers_log_the_numbers_of_a_record(record):
    logged = scalars({"step": 7, "time": 1.0, **record})
    assert "step" not in logged and "time" not in logged
    expected = {k for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)} - {"step", "time"}
    assert set(logged) == expected and all(isinstance(v, float) for v in logged.values())


def test_trackers_are_checked_before_ranks_start(monkeypatch):
    from plait.config import JobConfig
    from plait.errors import ConfigError
    from plait.train import trackers

    cfg = SimpleNamespace(metrics=SimpleNamespace(wandb=True, mlflow=False))
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install 'plait\\[wandb\\]'"):
        trackers.check_trackers(cfg)
    assert JobConfig().metrics.host == "127.0.0.1" and JobConfig().metrics.serve == 0  # loopback, off
