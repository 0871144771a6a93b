"""Chat records -> token ids and a loss mask that counts only the assistant's tokens.

A record is a parsed jsonl line ``{"messages": [{"role": ..., "content": ...}, ...]}``. The
conversation is rendered with the tokenizer's chat template (``chat_template``) and the whole
text is tokenized at once, without added special tokens (the template writes its own), exactly
as transformers' ``apply_chat_template(..., tokenize=True)`` does. A token counts in the loss when
its characters overlap an assistant span, the rule of transformers'
``return_assistant_tokens_mask``, so both masks agree.

Assistant spans come from the template's ``{% generation %}`` blocks. A template without them
is rendered prefix by prefix: assistant message i spans what ``messages[:i+1]`` renders beyond
``messages[:i]`` with the generation prompt, which needs a template whose output only grows.
"""

from __future__ import annotations

from typing import Any

from plait.data.chat_template import SPAN_CLOSE, SPAN_OPEN, ChatTemplate
from plait.data.tokenizer import Tokenizer
from plait.errors import DataError

ASSISTANT = "assistant"
MESSAGE_FORM = 'list of {"role": string, "content": string} objects'


def messages_of(record: Any, where: str) -> list[dict]:
    """The validated ``messages`` of a parsed jsonl record; raises DataError naming the problem."""
    if not isinstance(record, dict) or "messages" not in record:
        raise DataError(
            f"{where}: a chat record must be an object with \"messages\": a {MESSAGE_FORM}"
        )
    return validated_messages(record["messages"], where)


def validated_messages(messages: Any, where: str) -> list[dict]:
    """``messages`` as plain dicts, checked: string role and content, at least one assistant turn.

    Keys other than role and content are kept for the template, except those set to null, which
    transformers drops too (templates test whether a key is present).
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty {MESSAGE_FORM}")
    checked = [_validated_message(m, f"{where} message {i + 1}") for i, m in enumerate(messages)]
    if not any(m["role"] == ASSISTANT for m in checked):
        raise DataError(
            f"{where}: the conversation has no assistant turn; chat data needs at least one "
            f"message with role \"{ASSISTANT}\" (its tokens are what the loss counts)"
        )
    return checked


def _validated_message(message: Any, where: str) -> dict:
    if not isinstance(message, dict):
        raise DataError(f"{where} is {_json_type(message)}; \"messages\" must be a {MESSAGE_FORM}")
    for key in ("role", "content"):
        value = message.get(key)
        if not isinstance(value, str):
            found = "missing" if key not in message else _json_type(value)
            raise DataError(f"{where}: \"{key}\" is {found}; it must be a string")
        if SPAN_OPEN in value or SPAN_CLOSE in value:
            raise DataError(
                f"{where}: \"{key}\" contains U+FDD0/U+FDD1, Unicode noncharacters reserved for "
                "plait's internal use; remove them"
            )
    return {key: value for key, value in message.items() if value is not None}


def _json_type(value: Any) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
             list: "a list", dict: "an object"}
    return names.get(type(value), f"a {type(value).__name__}")


class ChatEncoder:
    """Renders conversations with a chat template and tokenizes them with an assistant mask."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self._tagged = template.has_generation_tags

    def encode(self, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
        """Token ids of the rendered conversation and a same-length mask, 1 on assistant tokens."""
        messages = validated_messages(messages, where)
        if self._tagged:
            text, spans = self.template.render(messages, where)
        else:
            text, spans = self._render_by_prefixes(messages, where)
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        return ids, tokens_in_spans(offsets, spans)

    def _render_by_prefixes(
        self, messages: list[dict], where: str
    ) -> tuple[str, list[tuple[int, int]]]:
        """The full text and each assistant message's span, found by rendering prefixes."""
        text, _ = self.template.render(messages, where)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != ASSISTANT:
                continue
            context = f"{where} (rendering the conversation up to message {i + 1})"
            before, _ = self.template.render(messages[:i], context, add_generation_prompt=True)
            through, _ = self.template.render(messages[: i + 1], context)
            if not (through.startswith(before) and text.startswith(through)):
                raise DataError(
                    f"{where}: chat template {self.template.origin} is not prefix-stable (a "
                    f"conversation's start renders differently from the whole), so assistant "
                    "turns cannot be located; add {% generation %}...{% endgeneration %} tags "
                    "around the assistant output in the template"
                )
            spans.append((len(before), len(through)))
        return text, spans


def tokens_in_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose ``(start, end)`` characters overlap a span, else 0.

    transformers' rule: one pass over tokens and sorted spans; a token counts when it ends after
    the current span starts, so a token straddling a span's edge counts.
    """
    mask = [0] * len(offsets)
    span = 0
    for token, (start, end) in enumerate(offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        if end > spans[span][0]:
            mask[token] = 1
    return mask
