"""Chat templates: find a tokenizer's Jinja chat template and render conversations with it.

Templates are rendered as transformers renders them (trim_blocks, lstrip_blocks, loop controls,
``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text, the special-token
strings as variables), so plait's text equals ``apply_chat_template``'s. A template is a file a
user may have been handed, so it runs in Jinja's immutable sandbox: it can read its inputs but
reach no Python internals and change nothing.

``{% generation %}...{% endgeneration %}`` marks what the assistant writes; ``render`` returns
the character spans rendered inside those blocks.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from plait.errors import DataError

CONFIG_FILE, JINJA_FILE = "tokenizer_config.json", "chat_template.jinja"
# The named special tokens transformers passes to a template (its ``special_tokens_map``).
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"
)
# Unicode noncharacters, reserved for a program's internal use: they bracket a generation block's
# output while rendering and are removed from the text afterwards.
SPAN_OPEN, SPAN_CLOSE = "\ufdd0", "\ufdd1"
_SPAN_MARK = re.compile(f"[{SPAN_OPEN}{SPAN_CLOSE}]")

# For plait's own BPE tokenizers, whose only special token is <|endoftext|>: ChatML's shape in
# plain-text markers (byte-level BPE spells them out). The assistant turn ends with the real EOS
# token, inside the generation block, so a trained model learns to stop there.
BUILTIN_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|assistant|>\\n' }}"
    "{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)
BUILTIN_SPECIAL_TOKENS = {"eos_token": "<|endoftext|>"}


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template's Jinja source, where it came from and the special tokens it may use.

    Plain strings only, so it pickles into tokenization workers; each process compiles the source
    once (cached).
    """

    source: str
    origin: str  # a file path, or "built-in"
    special_tokens: dict[str, str] = field(default_factory=dict)

    @property
    def has_generation_tags(self) -> bool:
        """Whether the template marks assistant output with ``{% generation %}`` blocks."""
        _compile(self.source, self.origin)  # a syntax error is a DataError, not a Jinja error
        parsed = _environment().parse(self.source)
        return any(_is_generation_block(block) for block in parsed.find_all(nodes.CallBlock))

    def render(
        self, messages: list[dict], where: str, add_generation_prompt: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the ``(start, end)`` spans of its generation blocks."""
        compiled = _compile(self.source, self.origin)
        variables = {
            **self.special_tokens,
            "messages": messages,
            "tools": None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            marked = compiled.render(variables)
        except Exception as exc:  # Jinja errors, and Python's own for e.g. 'a' + 1 in the template
            raise DataError(
                f"{where}: chat template {self.origin} failed to render: {_one_line(exc)}"
            ) from None
        return _strip_span_marks(marked, where, self.origin)


BUILTIN = "builtin"  # the data.chat_template value naming BUILTIN_TEMPLATE


def load_chat_template(tokenizer_spec: str, override: str = "") -> ChatTemplate:
    """The chat template for ``tokenizer_spec`` (a ``data.tokenizer`` value).

    ``override`` (``data.chat_template``) is a .jinja file, or ``"builtin"`` for plait's own
    template, and wins over everything. Otherwise a
    tokenizer file's template comes from the ``tokenizer_config.json`` or ``chat_template.jinja``
    beside it, and plait's ``bpe:N``/``gpt2`` tokenizers get ``BUILTIN_TEMPLATE``.
    """
    tokenizer_file = tokenizer_spec.endswith((".json", ".model"))
    folder = os.path.dirname(os.path.expanduser(tokenizer_spec)) if tokenizer_file else ""
    if tokenizer_file:
        special = _special_tokens(os.path.join(folder, CONFIG_FILE))
    else:
        special = dict(BUILTIN_SPECIAL_TOKENS)  # plait's BPE and gpt2 both end text with it
    if override == BUILTIN:  # e.g. plait's own BPE saved as a tokenizer.json with a checkpoint
        template = ChatTemplate(BUILTIN_TEMPLATE, "built-in", {**BUILTIN_SPECIAL_TOKENS, **special})
    elif override:
        path = os.path.expanduser(override)
        template = ChatTemplate(_read_text(path, "data.chat_template"), path, special)
    elif tokenizer_file:
        template = _beside_tokenizer(tokenizer_spec, folder, special)
    else:
        template = ChatTemplate(BUILTIN_TEMPLATE, "built-in", special)
    _compile(template.source, template.origin)  # a syntax error surfaces now, not per record
    return template


def _beside_tokenizer(spec: str, folder: str, special: dict[str, str]) -> ChatTemplate:
    """The template in the tokenizer's ``tokenizer_config.json``, else its ``chat_template.jinja``."""
    config_path, jinja_path = os.path.join(folder, CONFIG_FILE), os.path.join(folder, JINJA_FILE)
    configured = _read_config(config_path).get("chat_template")
    if configured is not None:
        return ChatTemplate(_pick_default(configured, config_path), config_path, special)
    if os.path.isfile(jinja_path):
        return ChatTemplate(_read_text(jinja_path, "chat template"), jinja_path, special)
    raise DataError(
        f"tokenizer '{spec}' has no chat template (no chat_template in {config_path}, no "
        f"{jinja_path}); set data.chat_template to a .jinja file"
    )


def _pick_default(configured: Any, config_path: str) -> str:
    """A config's ``chat_template``: a string, or a list of {name, template} holding "default"."""
    if isinstance(configured, str):
        return configured
    if isinstance(configured, list):
        for entry in configured:
            if isinstance(entry, dict) and entry.get("name") == "default":
                if isinstance(entry.get("template"), str):
                    return entry["template"]
    raise DataError(
        f"{config_path}: chat_template must be a string or a list of "
        "{\"name\", \"template\"} objects with one named \"default\""
    )


def _special_tokens(config_path: str) -> dict[str, str]:
    """The named special tokens of a tokenizer_config.json: strings or {"content": ...} objects."""
    config = _read_config(config_path)
    tokens: dict[str, str] = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def _read_config(path: str) -> dict:
    """A tokenizer_config.json as a dict; {} when the file does not exist."""
    if not os.path.isfile(path):
        return {}
    try:
        config = json.loads(_read_text(path, "tokenizer config"))
    except json.JSONDecodeError as exc:
        raise DataError(f"tokenizer config {path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise DataError(f"tokenizer config {path} must hold a JSON object")
    return config


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} '{path}' cannot be read ({_one_line(exc)})") from None


class _GenerationTag(Extension):
    """``{% generation %}body{% endgeneration %}`` renders body between the span marks."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark_span"), [], [], body).set_lineno(lineno)

    def _mark_span(self, caller: Any) -> str:
        return SPAN_OPEN + caller() + SPAN_CLOSE


def _is_generation_block(block: nodes.CallBlock) -> bool:
    """Whether ``block`` is a ``{% generation %}`` block (``{% call %}`` blocks are CallBlocks too)."""
    target = block.call.node if isinstance(block.call, nodes.Call) else None
    return isinstance(target, nodes.ExtensionAttribute) and target.name == "_mark_span"


class _SafeNamespace(Namespace):
    """``namespace()`` that refuses underscore names, which could shadow its internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Namespace's signature: self may be a key
        self, values = args[0], dict(*args[1:], **kwargs)
        for name in values:
            _SafeNamespace._check(name)
        Namespace.__init__(self, values)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and ' (meant for HTML), which chat text must keep.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_dict(*args: Any, **kwargs: Any) -> dict:
    # A function, not the dict type itself, so a template cannot reach the type's attributes.
    return dict(*args, **kwargs)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now,
        dict=_make_dict, namespace=_SafeNamespace,
    )
    return env


@functools.lru_cache(maxsize=8)
def _compile(source: str, origin: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise DataError(
            f"chat template {origin} line {exc.lineno}: {_one_line(exc)}; it must be a "
            "Jinja template as transformers' apply_chat_template takes"
        ) from None


def _strip_span_marks(marked: str, where: str, origin: str) -> tuple[str, list[tuple[int, int]]]:
    """Remove the span marks; the outermost marked spans, in positions of the cleaned text."""
    spans: list[tuple[int, int]] = []
    removed = depth = start = 0
    for mark in _SPAN_MARK.finditer(marked):
        position = mark.start() - removed  # where the mark sits in the cleaned text
        removed += 1
        if mark.group() == SPAN_OPEN:
            start = position if depth == 0 else start
            depth += 1
            continue
        depth -= 1
        if depth < 0:
            break
        if depth == 0:
            spans.append((start, position))
    if depth != 0:
        raise DataError(
            f"{where}: chat template {origin} output has unbalanced generation marks; the text "
            "may not contain the Unicode noncharacters U+FDD0/U+FDD1"
        )
    return _SPAN_MARK.sub("", marked), spans


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (DataError messages are single lines)."""
    return " ".join(str(exc).split()) or type(exc).__name__
