"""Hugging Face names in plait: ``config.json`` <-> ModelConfig and HF tensor names <-> plait's.

Pure mapping, no files: :mod:`plait.checkpoint.hf` reads and writes the folders with it, and
:mod:`plait.checkpoint.hf_moe` maps what the mixture-of-experts architectures add. Numeric
fields are read through :mod:`plait.checkpoint.hf_fields`, which refuses a bad value in one line.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from plait.checkpoint import hf_moe
from plait.checkpoint.hf_fields import float_field, int_field
from plait.checkpoint.hf_placement import Placement, Slab, whole
from plait.config import ModelConfig
from plait.errors import CheckpointError, PlaitError
from plait.models.llama import Llama

# model_type -> transformers class name
ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}
# Qwen's architectures: q/k/v biases always (plait writes zeros when it has none), and a
# sliding_window that only counts when use_sliding_window is set.
QWEN_ARCHITECTURES = ("qwen2", "qwen2_moe")


def _arch(name: str) -> str:
    """The model_type ("llama", "qwen2_moe", ...) for a model_type or a class name."""
    for model_type, class_name in ARCHITECTURES.items():
        if name in (model_type, class_name):
            return model_type
    supported = ", ".join(ARCHITECTURES.values())
    raise PlaitError(f"unsupported Hugging Face architecture '{name}'; plait supports {supported}")


def _hf_architecture(hf: dict[str, Any]) -> str:
    """The model_type of a config.json dict, from ``architectures`` or else ``model_type``."""
    names = hf.get("architectures") or []
    if names:
        return _arch(names[0])
    return _arch(str(hf.get("model_type", "<none>")))


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Returns the ModelConfig described by a Hugging Face ``config.json`` dict.

    Raises CheckpointError (one line naming the field and value) for a size that is missing,
    not an integer, or below 1, a non-positive epsilon or RoPE base, or heads that do not divide
    the hidden size (key/value heads the heads); and PlaitError (one line) for an unknown
    architecture or a feature plait's model does not implement: sliding-window attention, a
    non-default head_dim, rope types other than "default"/"llama3", activations other than
    silu, o_proj or MLP biases, and the MoE layouts
    :func:`plait.checkpoint.hf_moe.moe_fields_from_hf` refuses.
    """
    arch = _hf_architecture(hf)
    dim, n_heads = int_field(hf, "hidden_size"), int_field(hf, "num_attention_heads")
    n_kv = int_field(hf, "num_key_value_heads", default=n_heads)  # null: as many as the heads
    if dim % n_heads:
        raise CheckpointError(
            f"hidden_size = {dim} is not divisible by num_attention_heads = {n_heads}"
        )
    if n_heads % n_kv:
        raise CheckpointError(
            f"num_attention_heads = {n_heads} is not divisible by num_key_value_heads = {n_kv}"
        )
    head_dim = int_field(hf, "head_dim", default=None)
    if head_dim is not None and head_dim != dim // n_heads:
        raise PlaitError(
            f"head_dim {head_dim} differs from hidden_size / num_attention_heads = "
            f"{dim // n_heads}; plait does not support a separate head_dim"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise PlaitError(f"hidden_act '{hf['hidden_act']}' is not supported; plait uses silu")
    if hf.get("mlp_bias"):
        raise PlaitError("mlp_bias = true is not supported; plait's MLP has no biases")
    max_pos = int_field(hf, "max_position_embeddings", default=2048)
    # Qwen2 ignores sliding_window unless use_sliding_window is set
    ignored = arch in QWEN_ARCHITECTURES and not hf.get("use_sliding_window", False)
    window = None if ignored else int_field(hf, "sliding_window", default=None)
    if window is not None and window < max_pos:
        raise PlaitError(
            f"sliding-window attention (sliding_window = {window} < max_position_embeddings = "
            f"{max_pos}) is not supported"
        )
    if "sliding_attention" in (hf.get("layer_types") or []):
        raise PlaitError("sliding-window attention (layer_types) is not supported")
    if arch == "llama" and hf.get("attention_bias"):
        # Llama's attention_bias also puts a bias on o_proj, which plait's model lacks.
        raise PlaitError("Llama attention_bias = true (o_proj bias) is not supported")
    moe_fields = hf_moe.moe_fields_from_hf(hf, arch) if arch in hf_moe.MOE_ARCHITECTURES else {}
    cfg = ModelConfig(
        vocab_size=int_field(hf, "vocab_size"),
        dim=dim,
        n_layers=int_field(hf, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        ffn_dim=int_field(hf, "intermediate_size"),
        max_seq_len=max_pos,
        norm_eps=float_field(hf, "rms_norm_eps", default=1e-6),
        # Qwen2-MoE configs of transformers 5 may switch the biases off; older ones lack the key.
        qkv_bias=arch == "qwen2" or (arch == "qwen2_moe" and bool(hf.get("qkv_bias", True))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float_field(hf, "initializer_range", default=0.02),
        **moe_fields,
    )
    _rope_from_hf(hf, cfg)
    return cfg


def _rope_from_hf(hf: dict[str, Any], cfg: ModelConfig) -> None:
    """Fill cfg's rope fields from ``rope_theta``/``rope_scaling`` or ``rope_parameters``."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    for name, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise CheckpointError(f"{name} = {value!r}; it must be an object or null")
    cfg.rope_theta = float_field(hf, "rope_theta", default=None) or float_field(
        params, "rope_theta", default=10000.0, label="rope_parameters."
    )
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return
    if rope_type != "llama3":
        raise PlaitError(
            f"rope type '{rope_type}' is not supported; plait supports default and llama3"
        )
    label = "rope_scaling." if hf.get("rope_scaling") else "rope_parameters."
    cfg.rope_scaling = "llama3"
    cfg.rope_factor = float_field(scaling, "factor", label=label)
    cfg.rope_low_freq_factor = float_field(scaling, "low_freq_factor", label=label)
    cfg.rope_high_freq_factor = float_field(scaling, "high_freq_factor", label=label)
    cfg.rope_original_max_seq_len = int_field(
        scaling, "original_max_position_embeddings", label=label
    )


def config_to_hf(
    cfg: ModelConfig, architecture: str = "llama", dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Returns a ``config.json`` dict that transformers loads as ``architecture``.

    Qwen2 and Qwen2-MoE always have q/k/v biases (plait writes zeros when ``cfg.qkv_bias`` is
    false); Llama, Mistral and Mixtral cannot carry them, so ``qkv_bias`` with those raises
    PlaitError, and so does a dense model as Mixtral/Qwen2-MoE or an MoE model as a dense one.
    """
    arch = _arch(architecture)
    if cfg.has_gla():
        raise PlaitError("a model with GLA layers (model.attention, model.layer_pattern) has no Hugging Face "
                         "transformers architecture to be written as; keep it as a plait checkpoint")
    is_moe_arch = arch in hf_moe.MOE_ARCHITECTURES
    if bool(cfg.moe_experts) != is_moe_arch:
        kind = "mixture-of-experts" if cfg.moe_experts else "dense"
        fitting = _architecture_for(cfg)
        raise PlaitError(
            f"a {kind} model cannot be written as '{arch}'; use architecture '{fitting}'"
        )
    if cfg.qkv_bias and arch not in QWEN_ARCHITECTURES:
        raise PlaitError(
            f"a model with qkv_bias cannot be written as '{arch}' (its bias layout differs); "
            f"use architecture '{'qwen2_moe' if is_moe_arch else 'qwen2'}'"
        )
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": cfg.dim // cfg.n_heads,
        "intermediate_size": cfg.ffn_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if cfg.rope_scaling == "llama3":
        hf["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_seq_len,
        }
    if arch == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    elif arch in QWEN_ARCHITECTURES:
        hf.update(use_sliding_window=False, sliding_window=None)
    else:
        hf.update(sliding_window=None)
    if is_moe_arch:
        hf.update(hf_moe.moe_fields_to_hf(cfg, arch))
    return hf


# ---------------------------------------------------------------------------------------------
# tensor names

_ATTENTION_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
}
_MLP_NAMES = {
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}


def _layer_prefixes(i: int) -> tuple[str, str]:
    """Layer i's name prefix in Hugging Face and in plait."""
    return f"model.layers.{i}.", f"layers.{i}."


def _name_map(cfg: ModelConfig, arch: str) -> dict[str, str]:
    """HF tensor name -> plait parameter name, for every tensor the model has but the routed
    experts (:func:`_expert_map`)."""
    names = {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        "model.norm.weight": "norm.weight",
    }
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    for i in range(cfg.n_layers):
        hf, ours = _layer_prefixes(i)
        linear = _ATTENTION_NAMES if cfg.moe_experts else {**_ATTENTION_NAMES, **_MLP_NAMES}
        for hf_name, our_name in linear.items():
            names[f"{hf}{hf_name}.weight"] = f"{ours}{our_name}.weight"
        if cfg.moe_experts:
            names.update(hf_moe.router_and_shared_names(cfg, arch, hf, ours))
        if cfg.qkv_bias:
            for proj, w in (("q", "wq"), ("k", "wk"), ("v", "wv")):
                names[f"{hf}self_attn.{proj}_proj.bias"] = f"{ours}attention.{w}.bias"
        names[f"{hf}input_layernorm.weight"] = f"{ours}attention_norm.weight"
        names[f"{hf}post_attention_layernorm.weight"] = f"{ours}ffn_norm.weight"
    return names


def _expert_map(cfg: ModelConfig, arch: str) -> dict[str, tuple[str, int]]:
    """HF per-expert tensor name -> (plait's stacked expert parameter, expert index)."""
    if not cfg.moe_experts:
        return {}
    return {
        name: target
        for i in range(cfg.n_layers)
        for name, target in hf_moe.expert_names(cfg, arch, *_layer_prefixes(i)).items()
    }


def _check_names(found: set[str], expected: set[str], where: str) -> None:
    """Raise CheckpointError naming the first few missing or unexpected tensors."""

    def first(names: set[str]) -> str:
        listed = sorted(names)
        more = f" (+{len(listed) - 3} more)" if len(listed) > 3 else ""
        return ", ".join(listed[:3]) + more

    if missing := expected - found:
        raise CheckpointError(f"{where}: missing tensors {first(missing)}")
    if unexpected := found - expected:
        raise CheckpointError(f"{where}: unexpected tensors {first(unexpected)}")


def placements(cfg: ModelConfig, architecture: str | None = None) -> dict[str, Placement]:
    """plait parameter name -> where it lies in a checkpoint of ``architecture`` with one tensor
    per expert (what plait writes), in the order of plait's state dict. The parameters' shapes
    are read off a model built on the meta device."""
    arch = _arch(architecture or _architecture_for(cfg))
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in Llama(cfg).state_dict().items()}
    slabs: dict[str, list[Slab]] = {ours: [Slab(hf)] for hf, ours in _name_map(cfg, arch).items()}
    experts = _expert_map(cfg, arch)
    for hf, (ours, e) in sorted(experts.items(), key=lambda item: item[1][1]):
        slabs.setdefault(ours, []).append(Slab(hf))
    stacked = {ours for ours, _ in experts.values()}
    return {
        name: Placement(shape, tuple(slabs[name]), stacked=name in stacked)
        for name, shape in shapes.items()
    }


def placements_in(
    shapes: dict[str, tuple[int, ...]],
    cfg: ModelConfig,
    architecture: str | None = None,
    where: str = "checkpoint",
    origin: dict[str, str] | None = None,
) -> dict[str, Placement]:
    """plait parameter name -> where it lies in a checkpoint holding HF tensors of ``shapes``
    (HF name -> shape) for ``cfg`` (``architecture`` as in :func:`placements`).

    ``rotary_emb.inv_freq`` buffers are ignored, and so is a ``lm_head.weight`` stored beside
    tied embeddings; experts may be one tensor each or fused (:func:`hf_moe.fused_views`).
    Missing, unexpected or misshaped tensors raise CheckpointError (``where`` names the source
    in the message, or for a misshaped tensor its file in ``origin``: tensor name -> file).
    Only names and shapes are looked at: no tensor needs to be read.
    """
    arch = _arch(architecture or _architecture_for(cfg))
    views = {name: Slab(name) for name in shapes}
    if cfg.moe_experts:
        shapes, views = hf_moe.fused_views(shapes, arch, where)
    skip = lambda k: k.endswith("rotary_emb.inv_freq") or (  # noqa: E731
        cfg.tie_embeddings and k == "lm_head.weight"
    )
    present = {k: tuple(v) for k, v in shapes.items() if not skip(k)}
    ours = placements(cfg, arch)
    expected = {slab.name: place.hf_shape() for place in ours.values() for slab in place.slabs}
    _check_names(set(present), set(expected), where)
    for name, shape in present.items():
        if shape != expected[name]:
            source = views[name].name
            file = f"'{origin[source]}'" if origin and source in origin else where
            raise CheckpointError(
                f"{file}: {name} has shape {shape}, the config needs {expected[name]}"
            )
    return {
        name: replace(place, slabs=tuple(views[slab.name] for slab in place.slabs))
        for name, place in ours.items()
    }


def state_dict_from_hf(
    tensors: dict[str, torch.Tensor],
    cfg: ModelConfig,
    where: str = "checkpoint",
    architecture: str | None = None,
    origin: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Returns plait's state dict for HF-named ``tensors`` of ``architecture`` (default: the
    one :func:`save_pretrained` would pick for ``cfg``), checked and placed by
    :func:`placements_in` (same arguments, same errors); per-expert tensors are stacked."""
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    places = placements_in(shapes, cfg, architecture, where, origin)
    return {name: place.read(whole(place.shape), tensors.__getitem__) for name, place in places.items()}


def state_dict_to_hf(
    sd: dict[str, torch.Tensor], cfg: ModelConfig, architecture: str | None = None
) -> dict[str, torch.Tensor]:
    """Returns HF-named tensors of ``architecture`` (default as in :func:`state_dict_from_hf`)
    for plait's state dict ``sd``: tied embeddings appear once, as
    ``model.embed_tokens.weight``, and stacked experts as one tensor per expert."""
    places = placements(cfg, architecture)
    _check_names(set(sd), set(places), "plait state dict")
    tensors: dict[str, torch.Tensor] = {}
    for name, place in places.items():
        tensors.update(place.split(sd[name]))
    return tensors


def _default_architecture(model: Llama) -> str:
    """model.hf_architecture when set, else the architecture for the model's config."""
    return getattr(model, "hf_architecture", None) or _architecture_for(model.cfg)


def _architecture_for(cfg: ModelConfig) -> str:
    """The architecture that holds ``cfg`` most directly: with experts "qwen2_moe" when there
    are q/k/v biases or a shared expert (Mixtral has neither) and "mixtral" otherwise; dense,
    "qwen2" with q/k/v biases and "llama" without."""
    if cfg.moe_experts:
        return "qwen2_moe" if cfg.qkv_bias or cfg.moe_shared_ffn_dim else "mixtral"
    return "qwen2" if cfg.qkv_bias else "llama"
