"""Hugging Face interop: read and write ``config.json`` + safetensors folders.

Supported architectures are Llama, Qwen2 and Mistral (``LlamaForCausalLM``,
``Qwen2ForCausalLM``, ``MistralForCausalLM``) and the mixture-of-experts Mixtral and Qwen2-MoE
(``MixtralForCausalLM``, ``Qwen2MoeForCausalLM``; their MoE fields and expert tensors are mapped
in :mod:`plait.checkpoint.hf_moe`). RoPE in :mod:`plait.models.llama` already uses the rotate-half
layout of these checkpoints, so tensors are only renamed (and experts stacked), never permuted.
Weights are read with safetensors only; pickled ``pytorch_model.bin`` files are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from plait.config import ModelConfig
from plait.errors import CheckpointError, PlaitError
from plait.checkpoint import hf_moe
from plait.models.llama import Llama, rope_inv_freq

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
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


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

    Raises PlaitError (one line) for an unknown architecture or a feature plait's model does
    not implement: sliding-window attention, a non-default head_dim, rope types other than
    "default"/"llama3", activations other than silu, o_proj or MLP biases, and the MoE layouts
    :func:`plait.checkpoint.hf_moe.moe_fields_from_hf` refuses.
    """
    arch = _hf_architecture(hf)
    dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if dim % n_heads:
        raise PlaitError(f"hidden_size {dim} is not divisible by num_attention_heads {n_heads}")
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) != dim // n_heads:
        raise PlaitError(
            f"head_dim {head_dim} differs from hidden_size / num_attention_heads = "
            f"{dim // n_heads}; plait does not support a separate head_dim"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise PlaitError(f"hidden_act '{hf['hidden_act']}' is not supported; plait uses silu")
    if hf.get("mlp_bias"):
        raise PlaitError("mlp_bias = true is not supported; plait's MLP has no biases")
    max_pos = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window")
    if arch in QWEN_ARCHITECTURES and not hf.get("use_sliding_window", False):
        window = None  # Qwen2 ignores sliding_window unless use_sliding_window is set
    if window is not None and int(window) < max_pos:
        raise PlaitError(
            f"sliding-window attention (sliding_window = {window} < max_position_embeddings = "
            f"{max_pos}) is not supported"
        )
    if "sliding_attention" in (hf.get("layer_types") or []):
        raise PlaitError("sliding-window attention (layer_types) is not supported")
    if arch == "llama" and hf.get("attention_bias"):
        # Llama's attention_bias also puts a bias on o_proj, which plait's model lacks.
        raise PlaitError("Llama attention_bias = true (o_proj bias) is not supported")
    n_kv = hf.get("num_key_value_heads") or n_heads
    moe_fields = hf_moe.moe_fields_from_hf(hf, arch) if arch in hf_moe.MOE_ARCHITECTURES else {}
    cfg = ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        dim=dim,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        ffn_dim=int(hf["intermediate_size"]),
        max_seq_len=max_pos,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        # Qwen2-MoE configs of transformers 5 may switch the biases off; older ones lack the key.
        qkv_bias=arch == "qwen2" or (arch == "qwen2_moe" and bool(hf.get("qkv_bias", True))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        **moe_fields,
    )
    _rope_from_hf(hf, cfg)
    return cfg


def _rope_from_hf(hf: dict[str, Any], cfg: ModelConfig) -> None:
    """Fill cfg's rope fields from ``rope_theta``/``rope_scaling`` or ``rope_parameters``."""
    params = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    cfg.rope_theta = float(theta)
    scaling = hf.get("rope_scaling") or params
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return
    if rope_type != "llama3":
        raise PlaitError(
            f"rope type '{rope_type}' is not supported; plait supports default and llama3"
        )
    cfg.rope_scaling = "llama3"
    cfg.rope_factor = float(scaling["factor"])
    cfg.rope_low_freq_factor = float(scaling["low_freq_factor"])
    cfg.rope_high_freq_factor = float(scaling["high_freq_factor"])
    cfg.rope_original_max_seq_len = int(scaling["original_max_position_embeddings"])


def config_to_hf(
    cfg: ModelConfig, architecture: str = "llama", dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Returns a ``config.json`` dict that transformers loads as ``architecture``.

    Qwen2 and Qwen2-MoE always have q/k/v biases (plait writes zeros when ``cfg.qkv_bias`` is
    false); Llama, Mistral and Mixtral cannot carry them, so ``qkv_bias`` with those raises
    PlaitError, and so does a dense model as Mixtral/Qwen2-MoE or an MoE model as a dense one.
    """
    arch = _arch(architecture)
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


def _expected_hf_shapes(cfg: ModelConfig, arch: str) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> the shape ``cfg`` needs, read off a model built on the meta device."""
    with torch.device("meta"):
        model = Llama(cfg)
    tensors = state_dict_to_hf(model.state_dict(), cfg, arch)
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def state_dict_from_hf(
    tensors: dict[str, torch.Tensor],
    cfg: ModelConfig,
    where: str = "checkpoint",
    architecture: str | None = None,
    origin: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Returns plait's state dict for HF-named ``tensors`` of ``architecture`` (default: the
    one :func:`save_pretrained` would pick for ``cfg``).

    ``rotary_emb.inv_freq`` buffers are ignored, and so is a ``lm_head.weight`` stored beside
    tied embeddings; per-expert tensors are stacked, from either layout :mod:`hf_moe` reads.
    Missing, unexpected or misshaped tensors raise CheckpointError (``where`` names the source
    in the message, or for a misshaped tensor its file in ``origin``: tensor name -> file).
    """
    arch = _arch(architecture or _architecture_for(cfg))
    sources: dict[str, str] = {}
    if cfg.moe_experts:
        tensors, sources = hf_moe.split_fused_experts(tensors, arch, where)
    skip = lambda k: k.endswith("rotary_emb.inv_freq") or (  # noqa: E731
        cfg.tie_embeddings and k == "lm_head.weight"
    )
    present = {k: v for k, v in tensors.items() if not skip(k)}
    expected = _expected_hf_shapes(cfg, arch)
    _check_names(set(present), set(expected), where)
    for name, tensor in present.items():
        if tuple(tensor.shape) != expected[name]:
            source = sources.get(name, name)
            file = f"'{origin[source]}'" if origin and source in origin else where
            raise CheckpointError(
                f"{file}: {name} has shape {tuple(tensor.shape)}, the config needs {expected[name]}"
            )
    names = _name_map(cfg, arch)
    sd = {names[k]: v for k, v in present.items() if k in names}
    sd.update(hf_moe.stack_experts(present, _expert_map(cfg, arch)))
    return sd


def state_dict_to_hf(
    sd: dict[str, torch.Tensor], cfg: ModelConfig, architecture: str | None = None
) -> dict[str, torch.Tensor]:
    """Returns HF-named tensors of ``architecture`` (default as in :func:`state_dict_from_hf`)
    for plait's state dict ``sd``: tied embeddings appear once, as
    ``model.embed_tokens.weight``, and stacked experts as one tensor per expert."""
    arch = _arch(architecture or _architecture_for(cfg))
    to_hf = {ours: hf for hf, ours in _name_map(cfg, arch).items()}
    experts = _expert_map(cfg, arch)
    _check_names(set(sd), set(to_hf) | {ours for ours, _ in experts.values()}, "plait state dict")
    tensors = {to_hf[k]: v for k, v in sd.items() if k in to_hf}
    tensors.update(hf_moe.unstack_experts(sd, experts))
    return tensors


# ---------------------------------------------------------------------------------------------
# folders


def _read_config(path: str) -> dict[str, Any]:
    if not os.path.isdir(path):
        raise CheckpointError(f"Hugging Face checkpoint folder '{path}' does not exist")
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"'{file}' is missing; a Hugging Face checkpoint needs a config.json")
    try:
        with open(file, encoding="utf-8") as fh:
            hf = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"'{file}' is not valid JSON: {exc}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"'{file}' does not hold a JSON object")
    return hf


def _weight_files(path: str) -> dict[str, list[str] | None]:
    """Weight file -> the tensor names to read from it (None: all of them)."""
    single, index = os.path.join(path, WEIGHTS_FILE), os.path.join(path, INDEX_FILE)
    if os.path.isfile(single):
        return {single: None}
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"'{index}' is not a valid safetensors index: {exc}") from None
        files: dict[str, list[str] | None] = {}
        for name, shard in weight_map.items():
            files.setdefault(os.path.join(path, shard), []).append(name)  # type: ignore[union-attr]
        return files
    pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
    hint = f" (found {pickles[0]}; plait loads only safetensors)" if pickles else ""
    raise CheckpointError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in '{path}'{hint}")


def _load_tensors(
    path: str, device: str | torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Returns (HF-named tensors, tensor name -> the file it came from)."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for file, names in _weight_files(path).items():
        if not os.path.isfile(file):
            raise CheckpointError(f"weight shard '{file}' is missing")
        try:
            with safe_open(file, framework="pt", device=str(device)) as fh:
                if names is not None and (absent := sorted(set(names) - set(fh.keys()))):
                    raise CheckpointError(f"'{file}' lacks {absent[0]}, which the index lists")
                for name in fh.keys() if names is None else names:
                    tensors[name] = fh.get_tensor(name)
                    origin[name] = file
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises several types for a bad file
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"'{file}' is not a valid safetensors file: {reason}") from None
    return tensors, origin


def from_pretrained(
    path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Llama:
    """Returns a plait ``Llama`` holding the Hugging Face checkpoint in folder ``path``.

    The model's ``hf_architecture`` attribute keeps the source model_type so
    :func:`save_pretrained` writes the same architecture back. Raises CheckpointError (one
    line naming the file) when the folder, config or weights are missing, corrupt or do not
    match, and PlaitError for an unsupported architecture.
    """
    hf = _read_config(path)
    where = os.path.join(path, CONFIG_FILE)
    try:
        arch = _hf_architecture(hf)
        cfg = config_from_hf(hf)
    except KeyError as exc:
        raise CheckpointError(f"'{where}' lacks the field {exc}") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"'{where}' has an invalid value: {exc}") from None
    except PlaitError as exc:
        raise PlaitError(f"'{where}': {exc}") from None
    tensors, origin = _load_tensors(path, device)
    sd = state_dict_from_hf(tensors, cfg, where=f"'{path}'", architecture=arch, origin=origin)
    with torch.device("meta"):
        model = Llama(cfg)
    model.load_state_dict({name: tensor.to(dtype) for name, tensor in sd.items()}, assign=True)
    model.inv_freq = rope_inv_freq(cfg).to(device)  # non-persistent buffer, fp32 like init
    model.hf_architecture = arch
    return model


def save_pretrained(model: Llama, path: str, architecture: str | None = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` for ``model`` into folder ``path``.

    Files are written in a temporary folder beside ``path`` first, so a failure leaves
    nothing half-written. ``architecture`` defaults to ``model.hf_architecture`` if set, else
    to :func:`_architecture_for` the model's config. Returns None.
    """
    cfg = model.cfg
    arch = _arch(architecture or _default_architecture(model))
    dtype = model.tok_embeddings.weight.dtype
    hf_config = config_to_hf(cfg, arch, dtype=dtype)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tensors = state_dict_to_hf(sd, cfg, arch)
    if arch in QWEN_ARCHITECTURES and not cfg.qkv_bias:  # Qwen always has q/k/v biases: write zeros
        for name, weight in list(tensors.items()):
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                tensors[name.replace(".weight", ".bias")] = weight.new_zeros(weight.shape[0])

    target = os.path.abspath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        raise CheckpointError(f"'{path}' exists and is not a folder")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; give it a normal folder's mode
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as fh:
            json.dump(hf_config, fh, indent=2)
            fh.write("\n")
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def _move_into_place(tmp: str, target: str) -> None:
    """Rename folder ``tmp`` to ``target``; into an existing folder, replace our two files
    (weights first, config last) and drop a stale sharded index with its shards."""
    if not os.path.isdir(target) or not os.listdir(target):
        if os.path.isdir(target):
            os.rmdir(target)
        os.replace(tmp, target)
        return
    stale_index = os.path.join(target, INDEX_FILE)
    stale_shards: list[str] = []
    if os.path.isfile(stale_index):
        try:
            with open(stale_index, encoding="utf-8") as fh:
                stale_shards = sorted(set(json.load(fh)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        os.replace(os.path.join(tmp, name), os.path.join(target, name))
    for name in [INDEX_FILE, *stale_shards]:
        stale = os.path.join(target, name)
        if os.path.isfile(stale) and name != WEIGHTS_FILE:
            os.remove(stale)


# ---------------------------------------------------------------------------------------------
# plait convert


def is_hf_checkpoint(path: str) -> bool:
    """True when folder ``path`` has a config.json naming ``architectures``."""
    try:
        with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as fh:
            hf = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(hf, dict) and bool(hf.get("architectures"))


def hf_to_plait(src: str, dst: str) -> str:
    """Load the Hugging Face folder ``src`` and write a plait checkpoint to ``dst``.
    Returns a one-line description."""
    from plait.checkpoint.store import save_model_checkpoint

    from plait.config import JobConfig, TrainConfig

    model = from_pretrained(src)
    # A plait checkpoint carries a whole job config; the model section is what matters here.
    job = JobConfig(model=model.cfg, train=TrainConfig(seq_len=min(TrainConfig.seq_len, model.cfg.max_seq_len)))
    save_model_checkpoint(model, job, dst)
    n = sum(p.numel() for p in model.parameters())
    arch = ARCHITECTURES[model.hf_architecture]
    return f"wrote plait checkpoint {dst} ({n:,} parameters) from {arch} {src}"


def plait_to_hf(src: str, dst: str) -> str:
    """Load the plait checkpoint ``src`` and write a Hugging Face folder to ``dst``.
    Returns a one-line description."""
    from plait.checkpoint.store import load_model_checkpoint

    model, _cfg = load_model_checkpoint(src)
    arch = _arch(_default_architecture(model))
    save_pretrained(model, dst, arch)
    n = sum(p.numel() for p in model.parameters())
    return f"wrote Hugging Face {ARCHITECTURES[arch]} folder {dst} ({n:,} parameters) from {src}"


def convert(src: str, dst: str) -> str:
    """``plait convert SRC DST``: a Hugging Face folder becomes a plait checkpoint, and a plait
    checkpoint becomes a Hugging Face folder. Returns a one-line description of what was
    written."""
    if not os.path.exists(src):
        raise CheckpointError(f"'{src}' does not exist")
    if is_hf_checkpoint(src):
        return hf_to_plait(src, dst)
    return plait_to_hf(src, dst)
