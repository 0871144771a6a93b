"""TOML file + dotted command-line overrides -> typed sections, with one set of range checks.

The parser works on any root dataclass whose fields are sections (``JobConfig`` for ``plait train``,
the planner's request for ``plait plan``), so both commands share coercion, limits and messages.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
import typing
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

from plait.config.checks import validate
from plait.config.sections import JobConfig, config_key
from plait.errors import ConfigError, UsageError


def sections_of(root: Any) -> dict[str, type]:
    """A root dataclass's (or instance's) section types by name: ``model`` -> ModelConfig, ..."""
    hints = typing.get_type_hints(root if isinstance(root, type) else type(root))
    return {f.name: hints[f.name] for f in dataclasses.fields(root)}


SECTIONS: dict[str, type] = sections_of(JobConfig)


def section_fields(section: str, root: Any = JobConfig) -> dict[str, dataclasses.Field]:
    """A section's fields by the key users write (``config_key``: ``async`` for ``async_save``)."""
    return {config_key(f): f for f in dataclasses.fields(sections_of(root)[section])}


def has_key(root: Any, dotted: str) -> bool:
    """Whether ``section.field`` names a field of one of ``root``'s sections."""
    section, _, name = dotted.partition(".")
    return section in sections_of(root) and name in section_fields(section, root)


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


# Integer fields without a declared ``max`` stop here: a 32-bit count is far beyond any real
# job, and a 23-digit value would otherwise overflow torch or numpy long after the parse.
INT_MAX = 2**31 - 1


def _coerce(key: str, raw: Any, hint: Any, from_cli: bool) -> Any:
    """Turn ``raw`` into the field's type, or raise ConfigError naming the key and the type."""
    if typing.get_origin(hint) is typing.Union:  # a number or a word: ``int | Literal["auto"]``
        number, word = _number_or_word(hint)
        if raw in typing.get_args(word):
            return raw
        try:
            return _number(key, raw, number, from_cli)
        except ConfigError:
            raise ConfigError(f"{key} = {_short(raw)} is not {_type_name(hint)}") from None
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if raw not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{key} = {raw!r} is not allowed; choose one of {allowed}")
        return raw
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if from_cli and isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0"):
            return raw.lower() in ("true", "1")
        raise ConfigError(f"{key} = {raw!r} is not a boolean; use true or false")
    if hint in (int, float):
        return _number(key, raw, hint, from_cli)
    if hint is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{key} = {raw!r} is not a string")
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:  # undecodable command-line bytes arrive as lone surrogates
            raise ConfigError(f"{key} = {raw!r} is not valid UTF-8 text") from None
        return raw
    raise ConfigError(f"{key}: unsupported field type {hint}")  # pragma: no cover


def _number_or_word(hint: Any) -> tuple[type, Any]:
    """(the number type, the Literal of words) of an ``int | Literal[...]`` field."""
    args = typing.get_args(hint)
    number = next(a for a in args if a in (int, float))
    word = next(a for a in args if typing.get_origin(a) is Literal)
    return number, word


def _type_name(hint: Any) -> str:
    """How the config reference and messages name a field's type."""
    if typing.get_origin(hint) is Literal:
        return " | ".join(str(c) for c in typing.get_args(hint))
    if typing.get_origin(hint) is typing.Union:
        number, word = _number_or_word(hint)
        return f"{'an integer' if number is int else 'a number'} or {_type_name(word)}"
    return hint.__name__


def _number(key: str, raw: Any, hint: type, from_cli: bool) -> int | float:
    """An int or a finite float: NaN and infinities are no value any field can take."""
    word = "an integer" if hint is int else "a finite number"
    accepted = (int,) if hint is int else (int, float)
    value = None
    if isinstance(raw, accepted) and not isinstance(raw, bool):
        value = raw
    elif from_cli and isinstance(raw, str):
        try:
            value = hint(raw)
        except ValueError:  # not a number, or an int of more digits than Python converts
            pass
    if value is None:
        raise ConfigError(f"{key} = {_short(raw)} is not {word}")
    if hint is float:
        try:
            value = float(value)
        except OverflowError:  # a TOML integer beyond any float
            raise ConfigError(f"{key} = {_short(raw)} is out of range; it must be a finite number") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key} = {value!r} is not {word}")
    return value


def _short(raw: Any) -> str:
    """``raw`` for a message: a value of thousands of digits is cut to stay one readable line."""
    try:
        text = repr(raw)
    except ValueError:  # an int beyond Python's digit limit for printing
        return "an integer of thousands of digits"
    return text if len(text) <= 40 else f"{text[:20]}...{text[-8:]} ({len(text)} characters)"


def _check_range(dotted: str, value: Any, hint: Any, meta: Any) -> None:
    """The field's declared limits (``min``/``max``/``gt``/``lt``, ``nonempty`` in its metadata);
    an int field without a ``max`` is bounded by INT_MAX."""
    if isinstance(value, str) and typing.get_origin(hint) is typing.Union:
        return  # the word of an ``int | Literal["auto"]`` field
    if typing.get_origin(hint) is typing.Union:
        hint = _number_or_word(hint)[0]
    shown = _short(value)
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{dotted} = {shown} is out of range; it must be >= {meta['min']}")
    maximum = meta.get("max", INT_MAX if hint is int else None)
    if maximum is not None and value > maximum:
        raise ConfigError(f"{dotted} = {shown} is out of range; it must be <= {maximum}")
    if "gt" in meta and value <= meta["gt"]:
        raise ConfigError(f"{dotted} = {shown} is out of range; it must be > {meta['gt']}")
    if "lt" in meta and value >= meta["lt"]:
        raise ConfigError(f"{dotted} = {shown} is out of range; it must be < {meta['lt']}")
    if meta.get("nonempty") and not value.strip():
        raise ConfigError(f"{dotted} = {value!r} is empty; it must be set: {meta['doc']}")


def set_key(root: Any, dotted: str, raw: Any, from_cli: bool) -> None:
    """Coerce ``raw`` to the field's type, check its limits and set ``root.section.field``."""
    section, _, name = dotted.partition(".")
    sections = sections_of(root)
    if not has_key(root, dotted):
        scope = [section] if section in sections and name else list(sections)
        options = [f"{s}.{n}" for s in scope for n in section_fields(s, root)]
        raise ConfigError(f"unknown config key '{dotted}'{_closest(dotted, options)}")
    body = getattr(root, section)
    fld = section_fields(section, root)[name]
    hint = typing.get_type_hints(type(body))[fld.name]
    value = _coerce(dotted, raw, hint, from_cli)
    _check_range(dotted, value, hint, fld.metadata)
    setattr(body, fld.name, value)


def apply_toml(root: Any, path: str, known_only: bool = False) -> set[str]:
    """The TOML file's fields onto ``root``; returns the dotted keys it set. ``known_only``: fields
    and sections that ``root`` lacks are skipped (``plait plan`` reading a trainer TOML)."""
    given: set[str] = set()
    sections = sections_of(root)
    for section, body in load_toml(path).items():
        if known_only and section not in sections:
            continue
        if not isinstance(body, dict):
            raise ConfigError(
                f"'{section}' in {path} must be a [section] table{_closest(section, list(sections))}"
            )
        for name, raw in body.items():
            dotted = f"{section}.{name}"
            if known_only and not has_key(root, dotted):
                continue
            set_key(root, dotted, raw, from_cli=False)
            given.add(dotted)
    return given


def load_toml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {exc.start}); TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not valid TOML: {exc}") from None
    except ValueError as exc:  # tomllib's own int() on a number beyond Python's digit limit
        raise ConfigError(f"config file '{path}' holds a value that cannot be read: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file '{path}' cannot be read: {exc.strerror}") from None


def build_config(
    path: str | None = None,
    overrides: list[tuple[str, str]] | None = None,
    values: dict[str, Any] | None = None,
) -> JobConfig:
    """Defaults, then the TOML file, then ``values`` (typed), then CLI overrides (strings).

    Returns a validated JobConfig; raises ConfigError on the first problem.
    """
    cfg = JobConfig()
    if path is not None:
        apply_toml(cfg, path)
    for dotted, raw in (values or {}).items():
        set_key(cfg, dotted, raw, from_cli=False)
    for dotted, raw in overrides or []:
        set_key(cfg, dotted, raw, from_cli=True)
    validate(cfg)
    return cfg


# TOML basic strings take no raw control characters (a tab aside) and no raw DEL: a newline in a
# prompt written as is would make config.toml, and the checkpoint holding it, unreadable.
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string that ``tomllib`` reads back unchanged."""
    out = []
    for char in value:
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def to_toml(cfg: JobConfig) -> str:
    """The resolved config as TOML text (what ``plait train --print-config`` prints)."""
    lines: list[str] = []
    for section, body in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for name, value in body.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = toml_string(value)
            else:
                text = repr(value)
            lines.append(f"{name} = {text}")
        lines.append("")
    return "\n".join(lines)


def reference_markdown() -> str:
    """The config reference table of the README, generated from the dataclasses above."""
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for section, kind in SECTIONS.items():
        hints = typing.get_type_hints(kind)
        for name, fld in section_fields(section).items():
            hint = hints[fld.name]
            kind = _type_name(hint).replace("|", "\\|")
            default = fld.default
            text = "true" if default is True else "false" if default is False else repr(default) if isinstance(default, str) else str(default)
            rows.append(f"| `{section}.{name}` | {kind} | `{text}` | {fld.metadata['doc']} |")
    return "\n".join(rows)


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separate ``--section.field value`` / ``--section.field=value`` pairs from the rest."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            key = arg[2:]
            if "=" in key:
                key, value = key.split("=", 1)
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            else:
                raise UsageError(f"--{key} needs a value")
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def finite_float(text: str) -> float:
    """argparse ``type`` of a float flag: NaN and infinities are refused like any non-number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


class CommandParser(argparse.ArgumentParser):
    """argparse whose errors are one line (a UsageError: exit code 2) instead of a usage block."""

    def error(self, message: str):
        raise UsageError(f"{message} (see 'plait {self.prog.split()[-1]} --help')")
