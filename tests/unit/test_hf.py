"""Hugging Face interop: logits match transformers in both directions, errors are one line."""

from __future__ import annotations

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from plait.config import ModelConfig  # noqa: E402
from plait.errors import CheckpointError, PlaitError  # noqa: E402
from plait.checkpoint import hf  # noqa: E402
from plait.models.llama import build_model  # noqa: E402

TOL = 1e-5
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def make_hf(kind: str, **extra):
    """A seeded random tiny transformers model with non-trivial norms and biases."""
    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    config = cls[0](**TINY, **copy.deepcopy(extra))  # transformers edits rope dicts in place
    torch.manual_seed(0)
    model = cls[1](config).float().eval()
    with torch.no_grad():  # norms start at 1 and biases at 0; randomize so a mixup shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.5)
    return model


def save_hf(model, path) -> str:
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def ids(seed: int = 1, batch: int = 2, seq: int = 40) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (batch, seq), generator=gen)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def assert_logits_match(model, ref) -> None:
    """plait ``model`` and transformers ``ref`` give the same logits (within TOL) on ``ids()``."""
    x = ids()
    with torch.no_grad():
        expected = ref(x).logits
        got = model(x)
    assert got.shape == (2, 40, 128)
    assert max_diff(got, expected) <= TOL


@pytest.mark.parametrize(
    "kind, extra",
    [
        ("llama", dict(tie_word_embeddings=False, rope_theta=500000.0)),
        ("llama", dict(tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
        ("llama", dict(tie_word_embeddings=True)),
        ("qwen2", dict(tie_word_embeddings=True)),
        ("mistral", dict(sliding_window=None)),
    ],
    ids=["llama-gqa", "llama3-rope", "llama-tied", "qwen2-tied", "mistral"],
)
def test_hf_to_plait_logits_match(tmp_path, kind, extra):
    ref = make_hf(kind, **extra)
    model = hf.from_pretrained(save_hf(ref, tmp_path / "hf"))
    cfg = model.cfg
    assert model.hf_architecture == kind
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (64, 2, 4, 2)
    assert cfg.qkv_bias == (kind == "qwen2")
    assert cfg.tie_embeddings == ref.config.tie_word_embeddings
    assert cfg.rope_scaling == ("llama3" if "rope_scaling" in extra else "none")
    assert_logits_match(model, ref)


def test_llama3_scaling_matters(tmp_path):
    """Negative control: dropping the llama3 scaling must change the logits."""
    ref = make_hf("llama", rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
    model = hf.from_pretrained(save_hf(ref, tmp_path / "hf"))
    model.cfg.rope_scaling = "none"
    from plait.models.llama import rope_inv_freq

    model.inv_freq = rope_inv_freq(model.cfg)
    with torch.no_grad():
        assert max_diff(model(ids()), ref(ids()).logits) > 1e-3


@pytest.mark.parametrize(
    "arch, values",
    [
        ("llama", dict(n_kv_heads=2)),
        ("llama", dict(rope_scaling="llama3", rope_original_max_seq_len=64, rope_theta=5e5)),
        ("llama", dict(tie_embeddings=True)),
        ("qwen2", dict(n_kv_heads=2, qkv_bias=True, tie_embeddings=True)),
        ("qwen2", dict(n_kv_heads=1, qkv_bias=False)),
        ("mistral", dict(n_kv_heads=2)),
    ],
    ids=["llama", "llama3-rope", "llama-tied", "qwen2-bias-tied", "qwen2-nobias", "mistral"],
)
def test_plait_to_hf_logits_match(tmp_path, arch, values):
    cfg = ModelConfig(
        vocab_size=128, dim=64, n_layers=2, n_heads=4, ffn_dim=96, max_seq_len=256, **values
    )
    model = build_model(cfg, seed=3)
    with torch.no_grad():  # init leaves norms at 1 and biases at 0; randomize them
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.5)
    path = str(tmp_path / "out")
    hf.save_pretrained(model, path, architecture=arch)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # temp folder gone
    if cfg.tie_embeddings:
        assert "lm_head.weight" not in load_file(os.path.join(path, "model.safetensors"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
    assert type(ref).__name__ == hf.ARCHITECTURES[arch]
    x = ids()
    with torch.no_grad():
        assert max_diff(model(x), ref(x).logits) <= TOL
    back = hf.from_pretrained(path)  # and the round trip keeps every tensor
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_round_trip_keeps_architecture(tmp_path):
    model = hf.from_pretrained(save_hf(make_hf("mistral", sliding_window=None), tmp_path / "a"))
    hf.save_pretrained(model, str(tmp_path / "b"))
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"]
    hf.save_pretrained(model, str(tmp_path / "b"))  # overwriting an existing folder works
    assert hf.from_pretrained(str(tmp_path / "b")).hf_architecture == "mistral"


def test_sharded_checkpoint(tmp_path):
    ref = make_hf("llama")
    path = str(tmp_path / "hf")
    ref.save_pretrained(path, safe_serialization=True, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    model = hf.from_pretrained(path)
    with torch.no_grad():
        assert max_diff(model(ids()), ref(ids()).logits) <= TOL


def test_dtype_and_inv_freq(tmp_path):
    model = hf.from_pretrained(save_hf(make_hf("llama"), tmp_path / "hf"), dtype=torch.bfloat16)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model.inv_freq.dtype == torch.float32 and model.inv_freq.device.type == "cpu"
    assert model.layers["0"].attention.wq.weight.requires_grad


def test_rope_parameters_config(tmp_path):
    path = save_hf(make_hf("llama"), tmp_path / "hf")
    config_file = os.path.join(path, "config.json")
    config = json.loads(open(config_file).read())
    config.pop("rope_theta", None)
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.5}
    json.dump(config, open(config_file, "w"))
    assert hf.from_pretrained(path).cfg.rope_theta == 1234.5
    config["rope_parameters"] = {"rope_theta": 99.0, **LLAMA3_ROPE}
    json.dump(config, open(config_file, "w"))
    cfg = hf.from_pretrained(path).cfg
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_original_max_seq_len) == (99.0, "llama3", 64)


def test_legacy_rope_keys():
    base = dict(TINY, architectures=["LlamaForCausalLM"])
    cfg = hf.config_from_hf(dict(base, rope_theta=5e5, rope_scaling=dict(LLAMA3_ROPE, factor=32.0)))
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor) == (5e5, "llama3", 32.0)
    assert hf.config_from_hf(dict(base, rope_scaling={"type": "default"})).rope_scaling == "none"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(architectures=["GPT2LMHeadModel"]), "unsupported Hugging Face architecture"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn'"),
        (dict(head_dim=32), "head_dim"),
        (dict(architectures=["MistralForCausalLM"], sliding_window=128), "sliding-window"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_unsupported_configs(change, message):
    with pytest.raises(PlaitError, match=message) as info:
        hf.config_from_hf({**TINY, "architectures": ["LlamaForCausalLM"], **change})
    assert "\n" not in str(info.value)


def test_config_edge_cases():
    qwen = dict(TINY, architectures=["Qwen2ForCausalLM"], sliding_window=16)
    assert hf.config_from_hf(qwen).qkv_bias  # window ignored when not used
    mistral = dict(TINY, architectures=["MistralForCausalLM"], sliding_window=4096)
    assert hf.config_from_hf(mistral).max_seq_len == 256  # window wider than any sequence
    with pytest.raises(PlaitError, match="qwen2"):
        hf.config_to_hf(ModelConfig(vocab_size=8, qkv_bias=True), "llama")
    with pytest.raises(PlaitError, match="unsupported"):
        hf.config_to_hf(ModelConfig(vocab_size=8), "gpt2")


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        hf.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        hf.from_pretrained(str(tmp_path / "empty"))


def test_unknown_architecture_file(tmp_path):
    path = save_hf(make_hf("llama"), tmp_path / "hf")
    config_file = os.path.join(path, "config.json")
    config = json.loads(open(config_file).read())
    config["architectures"] = ["BertForMaskedLM"]
    json.dump(config, open(config_file, "w"))
    with pytest.raises(PlaitError, match="BertForMaskedLM") as info:
        hf.from_pretrained(path)
    assert "config.json" in str(info.value)


def test_missing_weights_and_pickles(tmp_path):
    path = save_hf(make_hf("llama"), tmp_path / "hf")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        hf.from_pretrained(path)
    open(os.path.join(path, "pytorch_model.bin"), "wb").close()
    with pytest.raises(CheckpointError, match="only safetensors"):
        hf.from_pretrained(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(tmp_path, damage):
    path = save_hf(make_hf("llama"), tmp_path / "hf")
    weights = os.path.join(path, "model.safetensors")
    data = open(weights, "rb").read()
    damaged = b"\x00garbage" * 10 if damage == "garbage" else data[: len(data) // 2]
    open(weights, "wb").write(damaged)
    with pytest.raises(CheckpointError, match="model.safetensors") as info:
        hf.from_pretrained(path)
    assert "\n" not in str(info.value)


def test_missing_unexpected_and_misshaped_tensors(tmp_path):
    path = save_hf(make_hf("llama"), tmp_path / "hf")
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    ignored = dict(tensors, **{"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    save_file(ignored, weights, metadata={"format": "pt"})
    hf.from_pretrained(path)  # old checkpoints carry inv_freq buffers: ignored

    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}, weights)
    missing = r"missing tensors model\.layers\.1\.mlp\.up_proj\.weight"
    with pytest.raises(CheckpointError, match=missing):
        hf.from_pretrained(path)
    save_file(dict(tensors, extra=torch.zeros(1)), weights)
    with pytest.raises(CheckpointError, match="unexpected tensors extra"):
        hf.from_pretrained(path)
    save_file(dict(tensors, **{"model.norm.weight": torch.ones(65)}), weights)
    misshaped = r"model\.safetensors.*model\.norm\.weight has shape \(65,\)"
    with pytest.raises(CheckpointError, match=misshaped):
        hf.from_pretrained(path)


def test_state_dict_names_round_trip():
    cfg = ModelConfig(vocab_size=16, dim=8, n_layers=2, n_heads=2, ffn_dim=12, qkv_bias=True)
    sd = build_model(cfg).state_dict()
    hf_sd = hf.state_dict_to_hf(sd, cfg)
    assert "model.layers.1.self_attn.k_proj.bias" in hf_sd and "lm_head.weight" in hf_sd
    assert hf_sd["model.layers.0.mlp.gate_proj.weight"] is sd["layers.0.feed_forward.w1.weight"]
    assert hf_sd["model.layers.0.mlp.down_proj.weight"] is sd["layers.0.feed_forward.w2.weight"]
    assert hf.state_dict_from_hf(hf_sd, cfg).keys() == sd.keys()
    with pytest.raises(PlaitError, match="missing tensors"):
        hf.state_dict_to_hf({k: v for k, v in sd.items() if k != "norm.weight"}, cfg)


def test_save_failure_leaves_nothing(tmp_path, monkeypatch):
    model = build_model(ModelConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, ffn_dim=12))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_file", boom)
    with pytest.raises(OSError):
        hf.save_pretrained(model, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_convert_dispatch(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(hf, "hf_to_plait", lambda s, d: calls.append(("hf", s, d)) or "a")
    monkeypatch.setattr(hf, "plait_to_hf", lambda s, d: calls.append(("plait", s, d)) or "b")
    src = save_hf(make_hf("llama"), tmp_path / "hf")
    (tmp_path / "ckpt").mkdir()
    assert hf.convert(src, "x") == "a"
    assert hf.convert(str(tmp_path / "ckpt"), "y") == "b"
    assert calls == [("hf", src, "x"), ("plait", str(tmp_path / "ckpt"), "y")]
    with pytest.raises(PlaitError, match="does not exist"):
        hf.convert(str(tmp_path / "missing"), "z")
