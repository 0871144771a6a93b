"""The token cache at scale: source units, worker processes, shards, locks, datasets sources."""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
import os
import random
from pathlib import Path

import numpy as np
import pytest

import plait.data.sources as sources
from plait.config import DataConfig
from plait.data import prepare_data
from plait.data.sources import iter_documents, plan_units
from plait.data.token_cache import Encoding, build_cache
from plait.data.token_store import CachedCorpus
from plait.data.tokenizer import build_tokenizer
from plait.errors import DataError

WORDS = "the king queen crown sword night day love death rose thorn speak hear é 猫".split()


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def _mixed_folder(folder: Path, docs: list[str]) -> None:
    """The documents spread over text files, a jsonl file and a parquet file of several row
    groups, in the folder's path order."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder.mkdir()
    for i, doc in enumerate(docs[:10]):
        (folder / f"a{i:02d}.txt").write_text(doc)
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[10:150]))
    pq.write_table(pa.table({"text": docs[150:]}), folder / "c.parquet", row_group_size=7)


def _tokens_of(folder: str) -> list[int]:
    corpus = CachedCorpus.open(folder)
    return corpus.split(np.arange(corpus.n_docs)).tokens.tolist()


def test_units_cover_every_record_once_and_workers_change_nothing(tmp_path, monkeypatch) -> None:
    docs = _docs(200)
    _mixed_folder(tmp_path / "corpus", docs)
    monkeypatch.setattr(sources, "UNIT_BYTES", 300)  # many small units: lines straddle every boundary
    units = plan_units(str(tmp_path / "corpus"))
    assert len(units) > 20 and {p.kind for u in units for p in u} == {"text", "jsonl", "parquet"}
    assert list(iter_documents(str(tmp_path / "corpus"))) == docs
    tokenizer = build_tokenizer("bpe:300", docs, str(tmp_path / "tok"), "fp")
    built = {}
    for workers in (1, 2):
        folder = str(tmp_path / f"cache{workers}")
        build_cache(Encoding(tokenizer, "text"), units, folder, workers, "")
        built[workers] = _tokens_of(folder)
    alone = [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eos_id]]
    assert built[1] == built[2] == alone  # the ids of tokenizing each document alone


def test_worker_errors_are_one_line_and_leave_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sources, "UNIT_BYTES", 100)
    source = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": d}) for d in _docs(30)]
    lines[23] = '{"text": 5}'
    source.write_text("\n".join(lines) + "\n")
    tokenizer = build_tokenizer("bpe:300", _docs(30), str(tmp_path / "tok"), "fp")
    with pytest.raises(DataError, match=r"d.jsonl' line 24: field 'text' is int; it must be a string") as info:
        build_cache(Encoding(tokenizer, "text"), plan_units(str(source)), str(tmp_path / "cache"), 2, "")
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "tok"]  # no cache, no temp folder


def _prepare_and_report(cache_dir: str, source: str, marker_dir: str) -> int:
    """Child process: prepare the data, counting (in marker files) how often the cache is built."""
    import plait.data.prepare as prepare

    real = prepare.build_cache

    def counted(*args, **kwargs):
        Path(marker_dir, f"built-{os.getpid()}").touch()
        return real(*args, **kwargs)

    prepare.build_cache = counted
    cfg = DataConfig(source=source, tokenizer="bpe:300", cache_dir=cache_dir, workers=1)
    return prepare_data(cfg, seq_len=16, seed=0).n_train_tokens


def test_ranks_sharing_a_cache_build_it_once(tmp_path) -> None:
    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(300)))
    (tmp_path / "markers").mkdir()
    args = (str(tmp_path / "cache"), str(source), str(tmp_path / "markers"))
    # An executor rather than a Pool: a child that cannot start fails the test instead of hanging it.
    with ProcessPoolExecutor(3, multiprocessing.get_context("spawn")) as pool:
        counts = list(pool.map(_prepare_and_report, *zip(*[args] * 3), timeout=300))
    assert len(set(counts)) == 1 and counts[0] > 0
    assert len(os.listdir(tmp_path / "markers")) == 1


def _saved_dataset(folder: Path, docs: list[str], as_dict: bool = False) -> Path:
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"body": docs, "n": list(range(len(docs)))})
    if as_dict:
        dataset = datasets.DatasetDict({"train": dataset, "test": dataset.select(range(3))})
    dataset.save_to_disk(str(folder))
    return folder


def test_datasets_save_to_disk_and_arrow_sources(tmp_path, monkeypatch) -> None:
    docs = _docs(120)
    monkeypatch.setattr(sources, "UNIT_BYTES", 500)
    plain = _saved_dataset(tmp_path / "plain", docs)
    whole = _saved_dataset(tmp_path / "whole", docs, as_dict=True)
    assert len(plan_units(str(plain))) > 3
    assert list(iter_documents(str(plain), "body")) == docs
    assert list(iter_documents(str(whole), "body")) == docs  # a DatasetDict's train split
    arrow = sorted((plain).glob("*.arrow"))
    assert list(iter_documents(str(arrow[0]), "body")) == docs  # an Arrow file read alone
    with pytest.raises(DataError, match=r"has no column 'text' \(columns: body, n\)"):
        list(iter_documents(str(plain)))
    (whole / "dataset_dict.json").write_text(json.dumps({"splits": ["validation"]}))
    with pytest.raises(DataError, match="without a 'train' split .* validation"):
        plan_units(str(whole))
    with pytest.raises(DataError, match="does not exist"):
        plan_units(str(tmp_path / "nowhere"))


def test_unreadable_shard_is_one_line(tmp_path) -> None:
    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(100)))
    cfg = DataConfig(source=str(source), tokenizer="bpe:300", cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
    prepare_data(cfg, seq_len=16, seed=0)
    (shard,) = (tmp_path / "cache" / "tokens").glob("*/shard_00000.docs.npy")
    shard.write_bytes(b"not numpy")
    with pytest.raises(DataError, match=r"shard 0 cannot be read; delete .* to rebuild it") as info:
        prepare_data(cfg, seq_len=16, seed=0)
    assert "\n" not in str(info.value)


def test_a_killed_build_leaves_nothing_behind_the_next(tmp_path) -> None:
    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(20)))
    dead = tmp_path / "cache" / ".key.tmp-dead0001"
    dead.mkdir(parents=True)
    (dead / "shard_00000.tokens").write_bytes(b"half")
    tokenizer = build_tokenizer("bpe:300", _docs(20), str(tmp_path / "tok"), "fp")
    build_cache(Encoding(tokenizer, "text"), plan_units(str(source)), str(tmp_path / "cache" / "key"), 1, "")
    assert sorted(os.listdir(tmp_path / "cache")) == ["key"]


def test_progress_reports_documents_and_tokens_per_second(tmp_path, capsys) -> None:
    from plait.data import TokenizeReporter

    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(300)))
    reporter = TokenizeReporter(every=0.0)  # not a terminal here: a line per report
    cfg = DataConfig(source=str(source), tokenizer="bpe:300", cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
    prepare_data(cfg, seq_len=16, seed=0, progress=reporter)
    reporter.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("plait: tokenizing: 300 documents,") and "docs/s" in lines[0] and "tokens/s" in lines[0]
    assert lines[-1].startswith("plait: tokenized 300 documents,")
    again = TokenizeReporter(every=0.0)
    prepare_data(cfg, seq_len=16, seed=0, progress=again)  # the cache is reused: nothing to report
    again.close()
    assert capsys.readouterr().out == ""
