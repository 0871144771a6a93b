"""Hugging Face ``datasets`` folders and parquet folders train through the CLI; a missing or
unreadable dataset is one line, exit code 2."""

from __future__ import annotations

import io
from contextlib import redirect_stderr

import pytest

from plait.cli import main
from tests.e2e.test_bad_inputs import TINY, assert_one_line
from tests.unit.test_token_cache import _docs


def _train(tmp_path, source: str, *extra: str) -> tuple[int, str]:
    err = io.StringIO()
    args = ["train", *TINY, "--data.source", source, "--data.cache_dir", str(tmp_path / "cache"),
            "--run.dir", str(tmp_path / "run"), *extra]
    with redirect_stderr(err):
        code = main(args)
    return code, err.getvalue()


def test_a_saved_dataset_trains(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": _docs(200)}).save_to_disk(str(tmp_path / "ds"))
    code, err = _train(tmp_path, str(tmp_path / "ds"), "--data.text_field", "body")
    assert code == 0, err
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()


def test_a_parquet_folder_trains(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "pq" / "b").mkdir(parents=True)
    docs = _docs(200)
    pq.write_table(pa.table({"text": docs[:120]}), tmp_path / "pq" / "a.parquet", row_group_size=16)
    pq.write_table(pa.table({"text": docs[120:]}), tmp_path / "pq" / "b" / "c.parquet")
    code, err = _train(tmp_path, str(tmp_path / "pq"))
    assert code == 0, err


def test_missing_or_broken_dataset_is_one_line(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    code, err = _train(tmp_path, str(tmp_path / "nowhere"))
    assert_one_line(code, err, "does not exist")
    datasets.Dataset.from_dict({"text": _docs(50)}).save_to_disk(str(tmp_path / "ds"))
    for arrow in (tmp_path / "ds").glob("*.arrow"):
        arrow.unlink()
    code, err = _train(tmp_path, str(tmp_path / "ds"))
    assert_one_line(code, err, "is not a readable datasets folder")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache" / "tokens").exists()
