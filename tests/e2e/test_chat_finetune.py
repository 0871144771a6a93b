"""Chat fine-tuning end to end: a Hugging Face Qwen2-family checkpoint with its own tokenizer
and chat template, fine-tuned on 2 ranks on conversations, lowers the assistant-token loss;
labels count only the assistant's tokens."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from plait.checkpoint.hf_source import HFWeights
from plait.config import build_config
from plait.data import prepare_data
from plait.data.chat import ChatEncoder
from plait.data.chat_demo import demo_conversations
from plait.data.chat_template import load_chat_template
from plait.launch import launch_training
from tests.unit.test_chat import QWEN_TEMPLATE, _write_tokenizer

transformers = pytest.importorskip("transformers")
STEPS = 24


@pytest.fixture(scope="module")
def chat_job(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    tokenizer = _write_tokenizer(root / "qwen", QWEN_TEMPLATE)
    hf_vocab = len(json.loads(tokenizer.read_text())["model"]["vocab"]) + 3  # + the special tokens
    config = transformers.Qwen2Config(
        vocab_size=hf_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(root / "qwen")  # beside its tokenizer
    source = root / "chat.jsonl"
    source.write_text("".join(json.dumps({"messages": c}) + "\n" for c in demo_conversations(160)))
    model = HFWeights(str(root / "qwen")).cfg
    values = {f"model.{f.name}": getattr(model, f.name) for f in dataclasses.fields(model)}
    return build_config(values={
        **values, "run.dir": str(root / "run"), "data.source": str(source), "data.format": "chat",
        "data.tokenizer": str(tokenizer), "data.cache_dir": str(root / "cache"), "data.val_fraction": 0.1,
        "checkpoint.init_from": str(root / "qwen"), "parallel.nproc": 2,
        "train.steps": STEPS, "train.seq_len": 128, "train.global_batch": 8, "train.micro_batch": 2,
        "train.lr": 3e-3, "train.warmup_steps": 2, "train.eval_every": 4, "train.eval_batches": 4,
        "train.sample_tokens": 0, "train.device": "cpu",
        "metrics.tensorboard": False, "metrics.plot": False, "metrics.progress": False,
    })


def test_labels_count_only_assistant_tokens(chat_job) -> None:
    data = prepare_data(chat_job.data, chat_job.train.seq_len, chat_job.train.seed)
    encoder = ChatEncoder(data.tokenizer, load_chat_template(chat_job.data.tokenizer))
    store = data.train.store
    first = demo_conversations(160)[0]
    ids, mask = encoder.encode(first, "test")
    # Document 0 of the train split is the first conversation unless it was held out.
    if store.tokens[0 : len(ids)].tolist() == ids:
        assert store.loss_mask[0 : len(ids)].tolist() == mask
    window = data.train[0]
    targets = np.asarray(store.tokens[1 : chat_job.train.seq_len + 1])
    scored = window["labels"].numpy() != -100
    assert scored.any() and not scored.all()
    assert (np.asarray(store.loss_mask[1 : chat_job.train.seq_len + 1])[scored] == 1).all()
    assert (window["labels"].numpy()[scored] == targets[scored]).all()


def test_finetune_on_two_ranks_lowers_the_assistant_loss(chat_job) -> None:
    result = launch_training(chat_job)
    val = [result.val_losses[s] for s in sorted(result.val_losses)]
    assert val[-1] < val[0] - 0.3, val  # the first evaluation is after 4 steps
    first, last = result.losses[1], np.mean([result.losses[s] for s in range(STEPS - 3, STEPS + 1)])
    assert last < first - 1.0, (first, last)
