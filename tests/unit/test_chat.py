"""Chat data: templates, assistant masks equal to transformers', the demo conversations, bad inputs."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from plait.data.chat import ChatEncoder, messages_of, tokens_in_spans
from plait.data.chat_demo import demo_conversations
from plait.data.chat_template import BUILTIN_TEMPLATE, ChatTemplate, load_chat_template
from plait.data.tokenizer import Tokenizer, build_tokenizer
from plait.errors import DataError

# Qwen2.5's ChatML template (default system prompt when none is given), with generation tags.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'assistant' %}\n"
    "        {{- '<|im_start|>assistant\\n' }}{% generation %}"
    "{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}\n"
    "    {%- elif not (message.role == 'system' and loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
UNTAGGED_TEMPLATE = QWEN_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
# Qwen2's pre-tokenizer split (digits one by one, letters with one leading non-letter).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog. You are a helpful assistant.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "Ünïcödé téxt, 日本語のテキスト, and emoji 🌍🚀 keep the byte-level alphabet busy.",
    "system user assistant: hello, how are you today? I am fine, thank you.\n\nNew lines too.",
    "Paragraphs\n\nbreak\n\noften\n\n\nhere, 1234 5678 café.",  # so "\n\n" becomes one token
]
FIXED_CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And héllo 🌍 in 日本語?"},
        {"role": "assistant", "content": "こんにちは 🌍"},
    ],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
    [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "ok"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": " spaced \n\n"},
     {"role": "tool", "content": "{\"x\": 1}"}, {"role": "assistant", "content": "<|im_end|>"}],
    # "\n\n" is one token made of the template's newline and the reply's first: it straddles the
    # span's start and counts (transformers masks every token overlapping a span).
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\nHi"}],
]


def _train_chatml_tokenizer() -> HFTokenizer:
    """A small BPE with Qwen2's pipeline: transformers' Qwen2Tokenizer rebuilds this pipeline
    around the saved vocabulary, so plait (which runs tokenizer.json as written) must match it."""
    hf = HFTokenizer(models.BPE())
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(PARAGRAPHS * 4, trainer=trainer)
    return hf


def _write_tokenizer(folder: Path, chat_template: object | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.json"
    path.write_text(_train_chatml_tokenizer().to_str())
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        # transformers' older AddedToken form; plait reads its "content"
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False,
                      "normalized": False, "rstrip": False, "single_word": False, "special": True},
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("qwen")
    _write_tokenizer(folder, QWEN_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def hf_reference(qwen_folder: Path) -> object:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(qwen_folder))


@pytest.fixture(scope="module")
def plait_tokenizer(qwen_folder: Path) -> Tokenizer:
    return build_tokenizer(str(qwen_folder / "tokenizer.json"), [], str(qwen_folder), "fp")


@pytest.fixture(scope="module")
def tagged_encoder(qwen_folder: Path, plait_tokenizer: Tokenizer) -> ChatEncoder:
    return ChatEncoder(plait_tokenizer, load_chat_template(str(qwen_folder / "tokenizer.json")))


def _reference(hf_tokenizer: object, messages: list[dict]) -> tuple[list[int], list[int]]:
    out = hf_tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


_CONTENT = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\ufdd0\ufdd1"),
             max_size=24),
    st.sampled_from(["", "Hello world", "héllo 🌍 мир", "<|im_end|>", " lead", "\n\nlead", "trail \n\n"]),
)
_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool"]), "content": _CONTENT}
)
_CONVERSATION = st.lists(_MESSAGE, min_size=1, max_size=6).filter(
    lambda messages: any(m["role"] == "assistant" for m in messages)
)


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=_CONVERSATION)
def test_mask_and_ids_equal_transformers(
    messages: list[dict], hf_reference: object, tagged_encoder: ChatEncoder
) -> None:
    assert tagged_encoder.encode(messages, "test") == _reference(hf_reference, messages)


@pytest.mark.parametrize("index", range(len(FIXED_CONVERSATIONS)))
def test_fixed_conversations_equal_transformers(
    index: int, hf_reference: object, tagged_encoder: ChatEncoder
) -> None:
    messages = FIXED_CONVERSATIONS[index]
    ids, mask = tagged_encoder.encode(messages, "test")
    assert (ids, mask) == _reference(hf_reference, messages)
    assert sum(mask) > 0


def test_demo_conversations_equal_transformers(
    hf_reference: object, tagged_encoder: ChatEncoder
) -> None:
    for messages in demo_conversations(limit=12):
        assert tagged_encoder.encode(messages, "demo") == _reference(hf_reference, messages)


@pytest.mark.parametrize("index", range(len(FIXED_CONVERSATIONS)))
def test_prefix_fallback_adds_the_newline_after_each_reply(
    index: int, hf_reference: object, plait_tokenizer: Tokenizer
) -> None:
    """Without tags an assistant span runs to the next turn, so it also holds the "\\n" that the
    template writes after <|im_end|>: exactly one more masked token per assistant turn. Before
    the first message there is no prefix the template can render (messages[0] is undefined)."""
    messages = FIXED_CONVERSATIONS[index]
    encoder = ChatEncoder(plait_tokenizer, ChatTemplate(UNTAGGED_TEMPLATE, "untagged.jinja"))
    assert not encoder.template.has_generation_tags
    if messages[0]["role"] == "assistant":
        with pytest.raises(DataError, match=r"up to message 1\).*failed to render"):
            encoder.encode(messages, "test")
        return
    ids, mask = encoder.encode(messages, "test")
    hf_ids, hf_mask = _reference(hf_reference, messages)
    im_end = plait_tokenizer.encode("<|im_end|>")[0]
    expected = list(hf_mask)
    run_ends = [i for i in range(len(ids) - 1) if hf_mask[i] and not hf_mask[i + 1]]
    for i in run_ends:  # the last token of a reply, then the newline the template adds
        assert ids[i] == im_end and plait_tokenizer.decode([ids[i + 1]]) == "\n"
        expected[i + 1] = 1
    assert ids == hf_ids
    assert mask == expected
    assert sum(mask) - sum(hf_mask) == sum(m["role"] == "assistant" for m in messages)


def test_prefix_fallback_refuses_an_unstable_template(plait_tokenizer: Tokenizer) -> None:
    unstable = "{% for m in messages %}{{ m.content }}{% if loop.last %}.{% endif %}{% endfor %}"
    encoder = ChatEncoder(plait_tokenizer, ChatTemplate(unstable, "unstable.jinja"))
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                {"role": "user", "content": "r"}]
    with pytest.raises(DataError, match="not prefix-stable.*generation") as caught:
        encoder.encode(messages, "f.jsonl line 3")
    assert "\n" not in str(caught.value)


def test_tokens_in_spans_counts_overlaps() -> None:
    offsets = [(0, 2), (2, 5), (5, 6), (6, 9), (9, 9), (9, 12)]
    assert tokens_in_spans(offsets, [(3, 6), (9, 10)]) == [0, 1, 1, 0, 0, 1]
    assert tokens_in_spans(offsets, []) == [0] * 6


def test_template_sources(tmp_path: Path) -> None:
    listed = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    path = _write_tokenizer(tmp_path / "listed", listed)
    template = load_chat_template(str(path))
    assert template.source == "D"
    assert template.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}

    path = _write_tokenizer(tmp_path / "jinja", None)
    (tmp_path / "jinja" / "chat_template.jinja").write_text("J")
    assert load_chat_template(str(path)).source == "J"

    override = tmp_path / "mine.jinja"
    override.write_text("O")
    assert load_chat_template(str(path), str(override)).source == "O"
    mine = load_chat_template("bpe:300", str(override))
    assert mine.source == "O" and mine.special_tokens == {"eos_token": "<|endoftext|>"}
    assert load_chat_template("gpt2").source == BUILTIN_TEMPLATE

    path = _write_tokenizer(tmp_path / "none", None)
    with pytest.raises(DataError, match="has no chat template.*set data.chat_template"):
        load_chat_template(str(path))
    with pytest.raises(DataError, match="data.chat_template .*cannot be read"):
        load_chat_template("bpe:300", str(tmp_path / "missing.jinja"))


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    cache = tmp_path_factory.mktemp("bpe")
    docs = [m["content"] for c in demo_conversations(limit=40) for m in c]
    return build_tokenizer("bpe:300", docs, str(cache), "fp")


def test_builtin_template_masks_exactly_the_replies(bpe_tokenizer: Tokenizer) -> None:
    encoder = ChatEncoder(bpe_tokenizer, load_chat_template("bpe:300"))
    conversations = demo_conversations()
    assert len(conversations) == 300 and conversations == demo_conversations()
    assert any(len(c) > 3 for c in conversations) and any(c[0]["role"] == "system" for c in conversations)
    for messages in conversations[:60]:
        ids, mask = encoder.encode(messages, "demo")
        assert len(ids) == len(mask)
        text, _ = encoder.template.render(messages, "demo")
        assert bpe_tokenizer.decode(ids) == text
        replies = "".join(m["content"] + "<|endoftext|>" for m in messages if m["role"] == "assistant")
        assert bpe_tokenizer.decode([i for i, m in zip(ids, mask) if m]) == replies
        assert "<|assistant|>\n" in text and ids.count(bpe_tokenizer.eos_id) == len(replies.split("<|endoftext|>")) - 1


@pytest.mark.parametrize(
    "source, problem",
    [
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
        ("{{ messages.append(messages[0]) }}", "unsafe"),
        ("{% set ns = namespace() %}{% set ns._x = 1 %}", "_x"),
        ("{{ raise_exception('only user and assistant roles are supported') }}",
         "only user and assistant roles are supported"),
        ("{{ messages[0].content.upper }}{{ cycler.__init__.__globals__ }}", "unsafe"),
        ("{{ messages[0].content + 1 }}", "can only concatenate str"),
        ("{{ eos_token + undefined_name.attribute }}", "'undefined_name' is undefined"),
    ],
)
def test_sandbox_and_template_errors_are_one_line(
    source: str, problem: str, bpe_tokenizer: Tokenizer
) -> None:
    encoder = ChatEncoder(bpe_tokenizer, ChatTemplate(source, "evil.jinja"))
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(DataError, match="chat.jsonl line 4: chat template evil.jinja failed") as caught:
        encoder.encode(messages, "chat.jsonl line 4")
    assert problem in str(caught.value) and "\n" not in str(caught.value)


def test_syntax_error_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(DataError, match=r"bad.jinja line \d+: .*Jinja template") as caught:
        load_chat_template("bpe:300", str(bad))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
        ({"messages": "hello"}, '"messages" must be a non-empty list'),
        ({"messages": []}, '"messages" must be a non-empty list'),
        ({"text": "x"}, 'must be an object with "messages"'),
        ({"messages": ["hi"]}, "message 1 is a str;"),
        ({"messages": [{"role": 1, "content": "x"}]}, '"role" is a number; it must be a string'),
        ({"messages": [{"role": "user"}]}, '"content" is missing'),
        ({"messages": [{"role": "assistant", "content": None}]}, '"content" is null'),
        ({"messages": [{"role": "assistant", "content": ["a"]}]}, '"content" is a list'),
        ({"messages": [{"role": "assistant", "content": "\ufdd0"}]}, "noncharacters"),
    ],
)
def test_bad_records_are_one_line_data_errors(record: object, problem: str) -> None:
    with pytest.raises(DataError) as caught:
        messages_of(record, "data file 'x.jsonl' line 12")
    message = str(caught.value)
    assert message.startswith("data file 'x.jsonl' line 12")
    assert problem in message and "\n" not in message


def test_messages_of_keeps_extra_keys_and_drops_nulls() -> None:
    record = {"messages": [{"role": "assistant", "content": "a", "name": "bot", "tool_calls": None}]}
    assert messages_of(record, "w") == [{"role": "assistant", "content": "a", "name": "bot"}]


def test_sentencepiece_offsets_are_characters() -> None:
    spm = pytest.importorskip("sentencepiece")
    lines = [f"the quick brown fox jumps over the lazy dog {i}" for i in range(200)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=40, model_type="bpe",
        minloglevel=2,
    )
    tokenizer = Tokenizer.from_sentencepiece(out.getvalue(), "sp")
    text = "the é fox"
    ids, offsets = tokenizer.encode_with_offsets(text)
    assert ids == tokenizer.encode(text)
    assert "é" in [text[start:end] for start, end in offsets]
    assert offsets[-1][1] == len(text)


def test_template_and_tokenizer_travel_to_workers(qwen_folder: Path) -> None:
    """Tokenization workers get the template pickled, or rebuild it from the same strings."""
    spec = str(qwen_folder / "tokenizer.json")
    template = load_chat_template(spec)
    assert pickle.loads(pickle.dumps(template)) == template == load_chat_template(spec)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["role", "content", "x"]), inner,
                                                                  max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(record=st.dictionaries(st.sampled_from(["messages", "text"]), JSON_VALUES, max_size=2))
def test_any_malformed_record_is_one_line_or_valid(record: dict) -> None:
    """Generated records: each is either a valid conversation or one DataError line."""
    try:
        messages = messages_of(record, "data file 'x.jsonl' line 7")
    except DataError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("data file 'x.jsonl' line 7")
        return
    assert any(m["role"] == "assistant" for m in messages)
    assert all(isinstance(m["content"], str) for m in messages)
