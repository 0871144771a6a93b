"""The live page's pieces without a browser: the incremental reader of a run's files, the
read-only loopback server, the health file the monitor writes, and the trackers' keys."""

from __future__ import annotations

import http.client
import json
import os
import socket

import pytest

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


def test_a_file_replaced_by_a_longer_one_is_read_anew(tmp_path):
    """A resumed run writes its kept steps to a new file, which may outgrow the old one before
    the reader looks again: the new inode says it started over."""
    from plait.checkpoint.atomic import atomic_write

    path = tmp_path / "m.jsonl"
    lines = JsonLines(str(path))
    write_rows(path, [{"step": s, "v": "old"} for s in range(1, 11)])
    lines.refresh()
    with atomic_write(str(path), "w", durable=False) as fh:
        fh.writelines(json.dumps({"step": s, "v": "new", "pad": "x" * 40}) + "\n" for s in range(1, 15))
    assert lines.refresh() is True and lines.generation == 1
    assert [(r["step"], r["v"]) for r in lines.rows] == [(s, "new") for s in range(1, 15)]


def test_an_odd_record_is_skipped_and_the_rest_is_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_rows(path, [{"step": 1, "moe_load_imbalance": ["x"]}, {"step": 2, "moe_load_imbalance": [1.5]}, [3]])
    reader = RunReader(str(tmp_path))
    rows = reader.state()["rows"]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["moe_max_imbalance"] is None and rows[1]["moe_max_imbalance"] == 1.5


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


def test_every_client_learns_that_the_rows_started_over(tmp_path):
    """Two tabs on one server: the one whose poll did not see the file replaced still starts over."""
    from plait.checkpoint.atomic import atomic_write

    folder = make_run(tmp_path / "run", steps=10)
    reader = RunReader(folder)
    first, second = reader.state(), reader.state()
    assert first["generation"] == second["generation"] == 0
    with atomic_write(os.path.join(folder, "metrics.jsonl"), "w", durable=False) as fh:
        fh.writelines(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 13))
    tab_a = reader.state(10, 1, first["generation"])
    tab_b = reader.state(10, 1, second["generation"])
    for tab in (tab_a, tab_b):
        assert tab["rows_from"] == 0 and [r["step"] for r in tab["rows"]] == list(range(1, 13)) and tab["generation"] == 1
    assert reader.state(12, 1, 1)["rows"] == []  # up to date


def test_a_new_run_in_a_used_run_dir_is_not_finished(tmp_path):
    """summary.json and pipeline.json of the previous run go when the next one starts logging."""
    from plait.config import build_config
    from plait.train.metrics import MetricsLogger

    folder = make_run(tmp_path / "run")
    for name in ("summary.json", "pipeline.json"):
        with open(os.path.join(folder, name), "w") as fh:
            fh.write("{}")
    assert RunReader(folder).state()["finished"] is True
    cfg = build_config(values={"run.dir": folder, "metrics.tensorboard": False, "metrics.progress": False})
    MetricsLogger(cfg, enabled=True, start_step=3)
    state = RunReader(folder).state()
    assert state["finished"] is False and state["pipeline"] is None


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
    assert request(page, "/api/state", host="127.0.0.1.evil.example")[0].status == 403
    for name in ("localhost", "127.0.0.1", "127.0.0.2", "[::1]"):
        assert request(page, "/api/state", host=f"{name}:{page.server_address[1]}")[0].status == 200, name
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
    writer.stop([None] * 4, [1])
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
    # Interrupted (Ctrl-C, a rank's user error): the ranks still running are stopped, the one
    # that had already failed crashed.
    restarted.stop([None, 1, None, 0], None)
    restarted.update([-9, 1, -9, 0], force=True)
    assert states(run_dir) == ["stopped", "crashed", "stopped", "done"]


def test_an_evicted_slow_rank_stays_slow_and_a_finished_one_is_done(tmp_path):
    writer = HealthWriter(str(tmp_path), FakeMonitor({0: beat(4), 1: beat(4)}, nproc=2), attempt=0)
    writer.update([None, None], Fault("slow", [1], 4, "compute per step 2x", fatal=True))  # evict_slow
    writer.stop([None, None], [1])
    writer.update([-9, -9], force=True)
    assert states(str(tmp_path)) == ["stopped", "slow"]
    writer = HealthWriter(str(tmp_path), FakeMonitor({0: beat(4), 1: beat(4)}, nproc=2), attempt=0)
    writer.update([None, None], Fault("slow", [1], 4, "compute per step 2x", fatal=False))
    writer.update([0, 0], force=True)
    assert states(str(tmp_path)) == ["done", "done"]


def test_a_bad_health_file_never_stops_the_monitor(tmp_path, capsys):
    with open(tmp_path / "ranks.json", "w") as fh:
        json.dump({"attempt": 0, "ranks": None}, fh)
    writer = HealthWriter(str(tmp_path), FakeMonitor({0: beat(1)}, nproc=1), attempt=1)
    assert writer.carried == {}
    writer.monitor.beats[0] = {"pid": 1}  # a heartbeat without the keys a row reads
    writer.update([None], force=True)
    assert "cannot write ranks.json" in capsys.readouterr().err


def test_a_skipped_nan_step_does_not_mark_the_rank(tmp_path):
    writer = HealthWriter(str(tmp_path), FakeMonitor({0: beat(1)}, nproc=1), attempt=0)
    writer.update([None], Fault("nan", [0], 1, "non-finite loss", fatal=False))
    assert states(str(tmp_path)) == ["healthy"]
    writer.update([None], Fault("nan", [0], 1, "non-finite loss"))  # on_nan = rollback: fatal
    assert states(str(tmp_path)) == ["nan"]


def test_trackers_log_the_numbers_of_a_record():
    record = {"step": 7, "time": 1.8e9, "loss": float("nan"), "lr": 1e-3, "tokens": 512, "comm_bytes": {"dp": 4},
              "moe_load_imbalance": [1.2], "flag": True, "name": "x", "val_loss": None}
    logged = scalars(record)
    assert logged.keys() == {"loss", "lr", "tokens"} and logged["tokens"] == 512.0 and logged["loss"] != logged["loss"]


def test_a_tracker_that_fails_is_dropped_and_the_others_go_on(capsys):
    from plait.train.trackers import log_to

    class Broken:
        def log(self, values, step):
            raise ConnectionError("server went away")

    class Kept:
        seen: list = []

        def log(self, values, step):
            self.seen.append(step)

    trackers = [Broken(), Kept()]
    log_to(trackers, {"loss": 1.0}, 3)
    log_to(trackers, {"loss": 0.9}, 4)
    assert [type(t).__name__ for t in trackers] == ["Kept"] and Kept.seen == [3, 4]
    assert "Broken stopped logging at step 3 (server went away)" in capsys.readouterr().err


def test_a_tracker_that_cannot_start_is_a_config_error(monkeypatch, tmp_path):
    from plait.config import build_config
    from plait.errors import ConfigError
    from plait.train import trackers

    def refuse(cfg):
        raise RuntimeError("api_key not configured (no-tty)\nmore lines")

    monkeypatch.setattr(trackers, "WandbTracker", refuse)
    cfg = build_config(values={"run.dir": str(tmp_path), "metrics.wandb": True, "metrics.tensorboard": False})
    with pytest.raises(ConfigError, match=r"^metrics.wandb = true but the tracker did not start: api_key not configured \(no-tty\)$"):
        trackers.open_trackers(cfg)


def test_trackers_are_checked_before_ranks_start(monkeypatch):
    from plait.config import JobConfig
    from plait.errors import ConfigError
    from plait.train import trackers

    from plait.launch import preflight

    cfg = JobConfig()
    cfg.metrics.wandb = True
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install 'plait\\[wandb\\]'"):
        preflight(cfg, cfg.parallel.nproc)  # before any data work or rank
    assert JobConfig().metrics.host == "127.0.0.1" and JobConfig().metrics.serve == 0  # loopback, off
