"""Every field of ``plait.config.JobConfig``, fed generated bad values on the command line and in a
TOML file: exit code 2, one line naming the field, no traceback, no run dir left behind.

The fields are read from the dataclasses, so a new field is fuzzed the day it is declared. Most
cases run in-process through ``plait.cli.main`` (fast); a few run ``python -m plait`` for real.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import typing
from typing import Any, Literal
from unittest import mock

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plait import cli
from plait.config import INT_MAX, SECTIONS, JobConfig, to_toml
from plait.launch import preflight
from tests.parallel.harness import write_corpus

FIELDS = [
    (section, f, typing.get_type_hints(kind)[f.name])
    for section, kind in SECTIONS.items()
    for f in dataclasses.fields(kind)
]
# Strings that mean nothing when blank: every other string field takes "" (no split, no fault, ...).
MUST_NOT_BE_EMPTY = {"run.dir", "data.source", "data.text_field", "data.tokenizer", "data.cache_dir", "metrics.host",
                     "metrics.wandb_project", "metrics.mlflow_experiment"}
FUZZ = settings(max_examples=6, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    corpus = write_corpus(str(root), n_docs=40)
    run_dir = str(root / "run")
    base = ["--run.dir", run_dir, "--data.source", corpus, "--data.cache_dir", str(root / "cache"),
            "--data.tokenizer", "bpe:300", "--parallel.nproc", "1", "--train.device", "cpu"]
    return {"root": str(root), "run": run_dir, "base": base}


def _refuse_to_start(cfg: JobConfig):
    """Stands in for launch_training: a bad value that got this far passed the parser, so check
    what the launcher checks first and fail the test instead of training."""
    preflight(cfg, cfg.parallel.nproc)
    raise AssertionError("the bad value was accepted: ranks would start")


def run_main(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), mock.patch.object(cli, "launch_training", _refuse_to_start):
        code = cli.main(args)
    return code, err.getvalue()


def assert_refused(env, code: int, err: str, key: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit code {code}, stderr: {err}"
    assert len(lines) == 1 and lines[0].startswith("plait: error: "), err
    assert key in lines[0], f"{key!r} not named in {lines[0]!r}"
    assert "Traceback" not in err
    assert not os.path.exists(env["run"]), "a refused start left run.dir behind"


# --- bad values, by the field's type and declared limits -------------------------------------------

def _not_parsing(kind: type) -> st.SearchStrategy[str]:
    def parses(text: str) -> bool:
        try:
            return math.isfinite(kind(text))
        except ValueError:
            return False
    return st.text(max_size=12).filter(lambda text: not parses(text))


def _out_of_range(hint: type, meta: dict) -> list[st.SearchStrategy]:
    """Numbers just past and far past each declared limit; ints above the default bound too."""
    out = []
    if hint is int:
        if "min" in meta:
            out.append(st.integers(max_value=meta["min"] - 1))
        top = meta.get("max", INT_MAX)
        out += [st.integers(min_value=top + 1), st.integers(min_value=10**22, max_value=10**30)]
        return out
    finite = {"allow_nan": False, "allow_infinity": False}
    # nextafter, not exclude_max: -0.0 is no value below a minimum of 0.
    if "min" in meta:
        out.append(st.floats(max_value=math.nextafter(meta["min"], -math.inf), **finite))
    if "max" in meta:
        out.append(st.floats(min_value=math.nextafter(meta["max"], math.inf), **finite))
    if "gt" in meta:
        out.append(st.floats(max_value=meta["gt"], **finite))
    if "lt" in meta:
        out.append(st.floats(min_value=meta["lt"], **finite))
    return out


def _number_or_words(hint: Any) -> tuple[type, tuple] | None:
    """(number type, words) of an ``int | Literal["auto"]`` field; None for any other type."""
    if typing.get_origin(hint) is not typing.Union:
        return None
    args = typing.get_args(hint)
    number = next(a for a in args if a in (int, float))
    return number, typing.get_args(next(a for a in args if typing.get_origin(a) is Literal))


def bad_cli_values(key: str, hint: Any, meta: dict) -> st.SearchStrategy[str]:
    """Command-line text the field must refuse."""
    either = _number_or_words(hint)
    if either is not None:  # what its number refuses, but for its words
        return bad_cli_values(key, either[0], meta).filter(lambda text: text not in either[1])
    if typing.get_origin(hint) is Literal:
        return st.text(max_size=12).filter(lambda text: text not in typing.get_args(hint))
    if hint is bool:
        return st.text(max_size=8).filter(lambda text: text.lower() not in ("true", "false", "1", "0"))
    undecodable = st.text(max_size=8).map(lambda text: text + "\udcff")  # bytes argv could not decode
    if hint is str:
        return st.one_of(undecodable, st.sampled_from(["", " ", "\t"])) if key in MUST_NOT_BE_EMPTY else undecodable
    non_numbers = st.sampled_from(["nan", "-nan", "inf", "-inf", "Infinity", "1e999", "-1e999", "", "x"])
    if hint is int:
        non_numbers = st.one_of(non_numbers, st.sampled_from(["1.5", "1e3", "0x10"]))
    ranges = [s.map(repr) for s in _out_of_range(hint, meta)]
    return st.one_of(non_numbers, _not_parsing(hint), *ranges)


def bad_toml_values(key: str, hint: Any, meta: dict) -> st.SearchStrategy[Any]:
    """Typed TOML values the field must refuse: other types, non-finite or out-of-range numbers."""
    either = _number_or_words(hint)
    if either is not None:
        return bad_toml_values(key, either[0], meta).filter(lambda value: value not in either[1])
    text, flag = st.text(max_size=8), st.booleans()
    ints, floats = st.integers(-(2**70), 2**70), st.floats()
    arrays = st.lists(st.integers(0, 9), max_size=3)
    if typing.get_origin(hint) is Literal:
        return st.one_of(text.filter(lambda t: t not in typing.get_args(hint)), ints, floats, flag, arrays)
    if hint is bool:
        return st.one_of(text, ints, floats, arrays)
    if hint is str:
        other = st.one_of(ints, floats, flag, arrays)
        return st.one_of(other, st.sampled_from(["", "  "])) if key in MUST_NOT_BE_EMPTY else other
    if hint is int:
        return st.one_of(text, flag, arrays, floats, *_out_of_range(int, meta))
    non_finite = st.sampled_from([math.nan, math.inf, -math.inf, 10**400])  # 10**400 is no float
    return st.one_of(text, flag, arrays, non_finite, *_out_of_range(float, meta))


def toml_value(value: Any) -> str:
    """``value`` in TOML, written here rather than by plait.config so the input stays independent."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


# --- the tests ---------------------------------------------------------------------------------------

FIELD_IDS = [f"{section}.{f.name}" for section, f, _ in FIELDS]


@pytest.mark.parametrize("index", range(len(FIELDS)), ids=FIELD_IDS)
@FUZZ
@given(data=st.data())
def test_bad_command_line_value(env, index, data):
    section, fld, hint = FIELDS[index]
    key = f"{section}.{fld.name}"
    raw = data.draw(bad_cli_values(key, hint, dict(fld.metadata)), label=key)
    code, err = run_main(["train", *env["base"], f"--{key}={raw}"])
    assert_refused(env, code, err, key)


@pytest.mark.parametrize("index", range(len(FIELDS)), ids=FIELD_IDS)
@FUZZ
@given(data=st.data())
def test_bad_toml_value(env, index, data):
    section, fld, hint = FIELDS[index]
    key = f"{section}.{fld.name}"
    value = data.draw(bad_toml_values(key, hint, dict(fld.metadata)), label=key)
    path = os.path.join(env["root"], "fuzz.toml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(f"[{section}]\n{fld.name} = {toml_value(value)}\n")
    code, err = run_main(["train", path, *env["base"]])
    assert_refused(env, code, err, key)


def test_every_field_is_fuzzed():
    """The strategies above know every type a field has (a new kind of field needs its own)."""
    kinds = {int, float, bool, str}
    for section, fld, hint in FIELDS:
        known = hint in kinds or typing.get_origin(hint) is Literal or _number_or_words(hint) is not None
        assert known, f"{section}.{fld.name}: {hint}"
        assert (f"{section}.{fld.name}" in MUST_NOT_BE_EMPTY) == bool(fld.metadata.get("nonempty"))


@FUZZ
@given(st.data())
def test_to_toml_round_trips_any_string(data):
    """Whatever string a field holds (newlines, quotes, control characters), config.toml reads back
    as the same values, so a checkpoint's config stays loadable."""
    cfg = JobConfig()
    for section, fld, hint in FIELDS:
        if hint is str:
            setattr(getattr(cfg, section), fld.name, data.draw(st.text(), label=f"{section}.{fld.name}"))
    assert tomllib.loads(to_toml(cfg)) == cfg.to_dict()


SUBPROCESS_CASES = {
    "nan_lr": (["--train.lr", "nan"], "train.lr = nan is not a finite number"),
    "huge_seed": (["--train.seed", "12345678901234567890123"], "train.seed = 12345678901234567890123 is out of range"),
    "beta1_one": (["--train.beta1", "1"], "train.beta1 = 1.0 is out of range; it must be < 1"),
    "empty_run_dir": (["--run.dir="], "run.dir = '' is empty"),
}


@pytest.mark.parametrize("name", sorted(SUBPROCESS_CASES))
def test_real_process(env, name):
    """``python -m plait``: exit status 2, one line, no traceback, end to end."""
    args, message = SUBPROCESS_CASES[name]
    proc = subprocess.run([sys.executable, "-m", "plait", "train", *env["base"], *args],
                          capture_output=True, text=True, cwd=env["root"], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plait: error: ") and message in lines[0], proc.stderr
    assert not os.path.exists(env["run"])
