"""Hugging Face interop for Mixtral and Qwen2-MoE: logits match transformers both ways, the
per-expert and fused expert layouts load, unsupported layouts fail in one line."""

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
from tests.unit.test_hf import TINY, assert_logits_match, ids, max_diff, save_hf  # noqa: E402

EXPERTS = dict(num_experts_per_tok=2)
MIXTRAL = dict(TINY, num_local_experts=4, **EXPERTS)
QWEN2_MOE = dict(
    TINY, num_experts=4, moe_intermediate_size=48, shared_expert_intermediate_size=80, **EXPERTS
)
# plait configs of the same shapes
PLAIT_MOE = dict(
    vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=256
)
PLAIT_MIXTRAL = dict(PLAIT_MOE, moe_experts=4, moe_top_k=2)
PLAIT_QWEN2_MOE = dict(
    PLAIT_MOE, moe_experts=4, moe_top_k=2, moe_ffn_dim=48, moe_shared_ffn_dim=80,
    moe_shared_gate=True, moe_norm_topk=False, qkv_bias=True,
)


def perturb(model) -> None:
    """Move norms, biases and routers off their initial values (ones, zeros: a mixup would not
    show, and a zero router ties every expert so the top-k picks are arbitrary), and scale the
    experts up from std 0.02 so their share of the logits shows."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "bias", "gate.weight")):
                param.add_(torch.randn_like(param) * 0.5)
            elif "experts" in name:
                param.mul_(5.0)


def make_hf_moe(kind: str, **extra):
    """A seeded random tiny Mixtral or Qwen2-MoE, perturbed."""
    config_cls, model_cls, base = {
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, MIXTRAL),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, QWEN2_MOE),
    }[kind]
    config = config_cls(**{**base, **copy.deepcopy(extra)})
    torch.manual_seed(0)
    model = model_cls(config).float().eval()
    perturb(model)
    return model


@pytest.mark.parametrize(
    "kind, extra, fused",
    [
        ("mixtral", {}, False),
        ("mixtral", dict(tie_word_embeddings=True), False),
        ("mixtral", {}, True),
        ("qwen2_moe", dict(norm_topk_prob=False), False),
        ("qwen2_moe", dict(norm_topk_prob=True, tie_word_embeddings=True), False),
        ("qwen2_moe", dict(norm_topk_prob=True), True),
        ("qwen2_moe", dict(qkv_bias=False), False),
    ],
    ids=["mixtral", "mixtral-tied", "mixtral-fused", "qwen2_moe", "qwen2_moe-norm-tied",
         "qwen2_moe-fused", "qwen2_moe-nobias"],
)
def test_hf_to_plait_logits_match(tmp_path, kind, extra, fused):
    ref = make_hf_moe(kind, **extra)
    path = str(tmp_path / "hf")
    ref.save_pretrained(path, save_original_format=not fused)
    names = load_file(os.path.join(path, "model.safetensors")).keys()
    assert any("experts.gate_up_proj" in name for name in names) == fused
    model = hf.from_pretrained(path)
    cfg = model.cfg
    assert model.hf_architecture == kind
    assert (cfg.moe_experts, cfg.moe_top_k, cfg.moe_router) == (4, 2, "softmax")
    assert cfg.moe_ffn_dim == (96 if kind == "mixtral" else 48)
    assert cfg.moe_shared_ffn_dim == (0 if kind == "mixtral" else 80)
    assert cfg.moe_norm_topk == (kind == "mixtral" or extra.get("norm_topk_prob", False))
    assert cfg.qkv_bias == (kind == "qwen2_moe" and extra.get("qkv_bias", True))
    assert_logits_match(model, ref)


def test_routing_details_matter(tmp_path):
    """Negative control: renormalizing Qwen2-MoE's top-k weights, or dropping its shared
    expert's gate, must change the logits."""
    ref = make_hf_moe("qwen2_moe", norm_topk_prob=False)
    model = hf.from_pretrained(save_hf(ref, tmp_path / "hf"))
    x = ids()
    with torch.no_grad():
        expected = ref(x).logits
        for layer in model.layers.values():
            layer.feed_forward.norm_topk = True
        assert max_diff(model(x), expected) > 1e-3
        for layer in model.layers.values():
            layer.feed_forward.norm_topk = False
            layer.feed_forward.shared.gate = None
        assert max_diff(model(x), expected) > 1e-3


@pytest.mark.parametrize(
    "arch, values",
    [
        ("mixtral", PLAIT_MIXTRAL),
        ("mixtral", dict(PLAIT_MIXTRAL, moe_ffn_dim=48, tie_embeddings=True, moe_top_k=1)),
        ("qwen2_moe", PLAIT_QWEN2_MOE),
        ("qwen2_moe", dict(PLAIT_QWEN2_MOE, qkv_bias=False, moe_norm_topk=True)),
    ],
    ids=["mixtral", "mixtral-tied-top1", "qwen2_moe", "qwen2_moe-nobias-norm"],
)
def test_plait_to_hf_logits_match(tmp_path, arch, values):
    model = build_model(ModelConfig(**values), seed=3)
    perturb(model)
    path = str(tmp_path / "out")
    hf.save_pretrained(model, path, architecture=arch)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    written = load_file(os.path.join(path, "model.safetensors"))
    block = "block_sparse_moe.experts.3.w2" if arch == "mixtral" else "mlp.experts.3.down_proj"
    assert f"model.layers.1.{block}.weight" in written  # per-expert names, as transformers writes
    ref = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
    assert type(ref).__name__ == hf.ARCHITECTURES[arch]
    assert_logits_match(model, ref)
    back = hf.from_pretrained(path)  # and the round trip keeps every tensor
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_convert_round_trip(tmp_path, kind):
    """HF folder -> plait checkpoint -> HF folder with ``plait convert``; the architecture
    comes back from the config alone."""
    ref = make_hf_moe(kind)
    src = save_hf(ref, tmp_path / "hf")
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    assert f"from {hf.ARCHITECTURES[kind]}" in hf.convert(src, ckpt)
    assert f"Hugging Face {hf.ARCHITECTURES[kind]} folder" in hf.convert(ckpt, back)
    again = transformers.AutoModelForCausalLM.from_pretrained(back).float().eval()
    assert_logits_match(hf.from_pretrained(back), again)
    with torch.no_grad():
        assert torch.equal(again(ids()).logits, ref(ids()).logits)  # every weight survived


@pytest.mark.parametrize(
    "values, arch",
    [
        (PLAIT_MIXTRAL, "mixtral"),
        (dict(PLAIT_MIXTRAL, qkv_bias=True), "qwen2_moe"),
        (dict(PLAIT_QWEN2_MOE, qkv_bias=False), "qwen2_moe"),  # a shared expert needs Qwen2-MoE
        (dict(PLAIT_MOE), "llama"),
    ],
)
def test_default_architecture(values, arch):
    assert hf._default_architecture(build_model(ModelConfig(**values))) == arch


def test_state_dict_names_round_trip():
    cfg = ModelConfig(**PLAIT_QWEN2_MOE)
    sd = build_model(cfg).state_dict()
    hf_sd = hf.state_dict_to_hf(sd, cfg)
    layer = "model.layers.1.mlp."
    ours = "layers.1.feed_forward."
    assert torch.equal(hf_sd[f"{layer}experts.2.gate_proj.weight"], sd[f"{ours}experts.w1"][2])
    assert torch.equal(hf_sd[f"{layer}experts.2.down_proj.weight"], sd[f"{ours}experts.w2"][2])
    assert hf_sd[f"{layer}shared_expert_gate.weight"] is sd[f"{ours}shared.gate.weight"]
    assert hf_sd[f"{layer}gate.weight"] is sd[f"{ours}gate.weight"]
    back = hf.state_dict_from_hf(hf_sd, cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    mixtral = ModelConfig(**PLAIT_MIXTRAL)
    names = hf.state_dict_to_hf(build_model(mixtral).state_dict(), mixtral)
    assert "model.layers.0.block_sparse_moe.experts.0.w3.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names


def test_training_only_fields_ignored():
    """Mixtral's router jitter noise only acts in training; the model loads without it."""
    noisy = dict(
        MIXTRAL, router_jitter_noise=0.1, router_aux_loss_coef=0.02, output_router_logits=True
    )
    cfg = hf.config_from_hf(dict(noisy, architectures=["MixtralForCausalLM"]))
    assert (cfg.moe_experts, cfg.moe_norm_topk) == (4, True)
    window_unused = dict(QWEN2_MOE, architectures=["Qwen2MoeForCausalLM"], sliding_window=0)
    assert hf.config_from_hf(window_unused).moe_shared_gate


@pytest.mark.parametrize(
    "config, change, message",
    [
        (QWEN2_MOE, dict(decoder_sparse_step=2), "decoder_sparse_step = 2"),
        (QWEN2_MOE, dict(mlp_only_layers=[1]), r"mlp_only_layers = \[1\]"),
        (QWEN2_MOE, dict(shared_expert_intermediate_size=0), "shared_expert_intermediate_size"),
        (QWEN2_MOE, dict(use_sliding_window=True, sliding_window=16), "sliding-window"),
        (MIXTRAL, dict(sliding_window=128), "sliding-window"),
        (MIXTRAL, dict(num_experts_per_tok=5), "num_experts_per_tok = 5"),
    ],
)
def test_unsupported_configs(config, change, message):
    arch = "MixtralForCausalLM" if config is MIXTRAL else "Qwen2MoeForCausalLM"
    with pytest.raises(PlaitError, match=message) as info:
        hf.config_from_hf({**config, "architectures": [arch], **change})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "values, arch, message",
    [
        (dict(PLAIT_MIXTRAL, moe_router="sigmoid"), "mixtral", "moe_router = 'sigmoid'"),
        (dict(PLAIT_MIXTRAL, moe_norm_topk=False), "mixtral", "always renormalizes"),
        (PLAIT_QWEN2_MOE, "mixtral", "qkv_bias"),
        (dict(PLAIT_QWEN2_MOE, qkv_bias=False), "mixtral", "shared expert"),
        (PLAIT_MIXTRAL, "qwen2_moe", "shared expert with a sigmoid gate"),
        (dict(PLAIT_QWEN2_MOE, moe_shared_gate=False), "qwen2_moe", "moe_shared_gate"),
        (PLAIT_MIXTRAL, "llama", "mixture-of-experts model cannot be written as 'llama'"),
        (PLAIT_MOE, "mixtral", "dense model cannot be written as 'mixtral'"),
    ],
)
def test_unwritable_models(values, arch, message):
    with pytest.raises(PlaitError, match=message) as info:
        hf.config_to_hf(ModelConfig(**values), arch)
    assert "\n" not in str(info.value)


def test_bad_expert_tensors(tmp_path):
    path = save_hf(make_hf_moe("mixtral"), tmp_path / "hf")
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    expert = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    save_file({k: v for k, v in tensors.items() if k != expert}, weights)
    with pytest.raises(CheckpointError, match=rf"missing tensors {expert}"):
        hf.from_pretrained(path)
    save_file(dict(tensors, **{expert: torch.zeros(95, 64)}), weights)
    misshaped = rf"model\.safetensors': {expert} has shape \(95, 64\)"
    with pytest.raises(CheckpointError, match=misshaped):
        hf.from_pretrained(path)
    fused = dict(tensors, **{"model.layers.1.mlp.experts.down_proj": torch.zeros(4, 64, 96)})
    save_file(fused, weights)
    with pytest.raises(CheckpointError, match="stored both alone and inside"):
        hf.from_pretrained(path)
    flat = {k: v for k, v in tensors.items() if ".experts." not in k or "layers.1." in k}
    save_file(dict(flat, **{"model.layers.0.mlp.experts.down_proj": torch.zeros(64)}), weights)
    not_3d = r"down_proj has shape \(64,\); fused experts are 3-D"
    with pytest.raises(CheckpointError, match=not_3d):
        hf.from_pretrained(path)


def test_bad_qwen2_moe_config_file(tmp_path):
    path = save_hf(make_hf_moe("qwen2_moe"), tmp_path / "hf")
    config_file = os.path.join(path, "config.json")
    config = json.loads(open(config_file).read())
    config["decoder_sparse_step"] = 2
    json.dump(config, open(config_file, "w"))
    with pytest.raises(PlaitError, match="config.json.*decoder_sparse_step") as info:
        hf.from_pretrained(path)
    assert "\n" not in str(info.value)
    del config["num_experts"]
    config["decoder_sparse_step"] = 1
    json.dump(config, open(config_file, "w"))
    with pytest.raises(CheckpointError, match="lacks the field 'num_experts'"):
        hf.from_pretrained(path)
