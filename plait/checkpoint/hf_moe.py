"""Hugging Face interop for mixture-of-experts checkpoints: Mixtral and Qwen2-MoE.

:mod:`plait.checkpoint.hf_mapping` handles everything the MoE models share with the dense
ones; this module maps what differs: the MoE fields of ``config.json`` to ModelConfig's
``moe_*`` fields and back, and the expert tensors to plait's stacked layout
(:class:`plait.models.moe.Experts`, ``w1``/``w3`` (experts, hidden, dim) and ``w2`` (experts,
dim, hidden)).

Checkpoints store one tensor per expert: ``model.layers.{i}.block_sparse_moe.experts.{e}.w1``
(w1 = gate, w3 = up, w2 = down) in Mixtral, ``model.layers.{i}.mlp.experts.{e}.gate_proj``
(``up_proj``, ``down_proj``) in Qwen2-MoE. Every checkpoint on the hub uses these names and
transformers 5 still writes them by default, although in memory it fuses the experts into
``mlp.experts.gate_up_proj`` (experts, 2·hidden, dim) and ``mlp.experts.down_proj`` (experts,
dim, hidden), and writes that layout with ``save_original_format=False``. plait reads both and
writes the per-expert names, which every transformers version loads.

Both architectures route with a softmax over the experts and keep the top k. Mixtral always
renormalizes the k weights; Qwen2-MoE does when ``norm_topk_prob`` is set and adds a shared
expert scaled by sigmoid(``shared_expert_gate`` · x), in every layer when
``decoder_sparse_step`` is 1 and ``mlp_only_layers`` is empty (the only layout plait has).

Fields read and dropped because they change training only, never the logits:
``router_jitter_noise`` (Mixtral's multiplicative noise on the router input while training;
plait's router has none, so fine-tuning such a model in plait trains without it),
``router_aux_loss_coef`` and ``output_router_logits`` (plait weighs its load-balancing loss
with the job's ``moe.aux_loss_coef``). Likewise ``moe_dispatch``/``moe_capacity_factor`` are
not written: transformers always runs dropless, so a model trained with capacity dispatch
gives its dropless logits there, and a loaded model is dropless in plait too.
"""

from __future__ import annotations

import re
from typing import Any

from plait.checkpoint.hf_fields import int_field
from plait.checkpoint.hf_placement import Slab
from plait.config import ModelConfig
from plait.errors import CheckpointError, PlaitError

MOE_ARCHITECTURES = ("mixtral", "qwen2_moe")

# The MoE block's module name and the HF names of plait's w1 (gate), w2 (down), w3 (up).
_BLOCK = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp"}
_EXPERT_PROJ = {
    "mixtral": {"w1": "w1", "w2": "w2", "w3": "w3"},
    "qwen2_moe": {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"},
}
_SHARED_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}  # Qwen2-MoE shared_expert

# transformers' in-memory layout: <layer>mlp.experts.gate_up_proj / down_proj, router mlp.gate.
_FUSED = re.compile(
    r"^(model\.layers\.\d+\.)mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)$"
)


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def moe_fields_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    """ModelConfig's ``moe_*`` fields for a Mixtral or Qwen2-MoE ``config.json`` dict.

    Raises CheckpointError (one line) for a count that is missing, not an integer or below 1,
    and PlaitError (one line) for a layout plait's MoE cannot hold: dense layers between
    the MoE ones, a Qwen2-MoE without its shared expert, a top k outside 1..experts.
    """
    if arch == "mixtral":
        experts = int_field(hf, "num_local_experts")
        fields: dict[str, Any] = dict(
            moe_ffn_dim=int_field(hf, "intermediate_size"), moe_norm_topk=True
        )
    else:
        step = int_field(hf, "decoder_sparse_step", default=1)
        dense_layers = hf.get("mlp_only_layers") or []
        if step != 1 or dense_layers:
            raise PlaitError(
                f"Qwen2-MoE with dense layers (decoder_sparse_step = {step}, mlp_only_layers = "
                f"{dense_layers}) is not supported; plait puts experts in every layer"
            )
        experts = int_field(hf, "num_experts")
        shared = int_field(hf, "shared_expert_intermediate_size", minimum=0)
        if shared <= 0:
            raise PlaitError(
                f"shared_expert_intermediate_size = {shared} is not supported; it must be > 0"
            )
        fields = dict(
            moe_ffn_dim=int_field(hf, "moe_intermediate_size"),
            moe_shared_ffn_dim=shared,
            moe_shared_gate=True,
            moe_norm_topk=bool(hf.get("norm_topk_prob", False)),
        )
    top_k = int_field(hf, "num_experts_per_tok")
    if top_k > experts:
        raise PlaitError(
            f"num_experts_per_tok = {top_k} must be between 1 and the {experts} experts"
        )
    return dict(fields, moe_experts=experts, moe_top_k=top_k, moe_router="softmax")


def moe_fields_to_hf(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    """The MoE fields of a ``config.json`` that transformers loads as ``arch``.

    Raises PlaitError when ``arch`` cannot express ``cfg``'s MoE: a sigmoid router (either
    architecture), a shared expert or unnormalized top-k weights (Mixtral), no gated shared
    expert (Qwen2-MoE).
    """
    name = "Mixtral" if arch == "mixtral" else "Qwen2-MoE"
    if cfg.moe_router != "softmax":
        raise PlaitError(
            f"moe_router = '{cfg.moe_router}' cannot be written as {name}, which routes with a "
            "softmax"
        )
    hidden = cfg.moe_ffn_dim or cfg.ffn_dim
    fields: dict[str, Any] = dict(num_experts_per_tok=cfg.moe_top_k, output_router_logits=False)
    if arch == "mixtral":
        if cfg.moe_shared_ffn_dim:
            raise PlaitError(
                "a model with a shared expert cannot be written as Mixtral; use architecture "
                "'qwen2_moe'"
            )
        if not cfg.moe_norm_topk:
            raise PlaitError(
                "moe_norm_topk = false cannot be written as Mixtral, which always renormalizes"
            )
        return dict(
            fields,
            num_local_experts=cfg.moe_experts,
            intermediate_size=hidden,
            router_jitter_noise=0.0,
        )
    if not (cfg.moe_shared_ffn_dim and cfg.moe_shared_gate):
        raise PlaitError(
            "Qwen2-MoE always has a shared expert with a sigmoid gate; set moe_shared_ffn_dim > 0 "
            "and moe_shared_gate = true, or use architecture 'mixtral'"
        )
    return dict(
        fields,
        # Biases are always written (zeros when plait has none): before transformers 5 every
        # Qwen2-MoE had them.
        qkv_bias=True,
        num_experts=cfg.moe_experts,
        moe_intermediate_size=hidden,
        shared_expert_intermediate_size=cfg.moe_shared_ffn_dim,
        norm_topk_prob=cfg.moe_norm_topk,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


# ---------------------------------------------------------------------------------------------
# tensor names


def router_and_shared_names(
    cfg: ModelConfig, arch: str, hf_layer: str, our_layer: str
) -> dict[str, str]:
    """HF tensor name -> plait parameter name for one layer's router and shared expert;
    ``hf_layer``/``our_layer`` are the layer's name prefixes ("model.layers.3.", "layers.3.")."""
    ours = f"{our_layer}feed_forward."
    names = {f"{hf_layer}{_BLOCK[arch]}.gate.weight": f"{ours}gate.weight"}
    if not cfg.moe_shared_ffn_dim:
        return names
    for our_proj, hf_proj in _SHARED_PROJ.items():
        hf_name = f"{hf_layer}mlp.shared_expert.{hf_proj}.weight"
        names[hf_name] = f"{ours}shared.{our_proj}.weight"
    if cfg.moe_shared_gate:
        names[f"{hf_layer}mlp.shared_expert_gate.weight"] = f"{ours}shared.gate.weight"
    return names


def expert_names(
    cfg: ModelConfig, arch: str, hf_layer: str, our_layer: str
) -> dict[str, tuple[str, int]]:
    """HF per-expert tensor name -> (plait's stacked parameter, expert index) for one layer."""
    block = f"{hf_layer}{_BLOCK[arch]}.experts"
    return {
        f"{block}.{e}.{hf_proj}.weight": (f"{our_layer}feed_forward.experts.{our_proj}", e)
        for our_proj, hf_proj in _EXPERT_PROJ[arch].items()
        for e in range(cfg.moe_experts)
    }


def fused_views(
    shapes: dict[str, tuple[int, ...]], arch: str, where: str
) -> tuple[dict[str, tuple[int, ...]], dict[str, Slab]]:
    """Views transformers' fused expert layout under the per-expert names: ``gate_up_proj``
    (experts, 2·hidden, dim) holds each expert's gate rows then up rows, ``down_proj`` each
    expert's down, and Mixtral's ``mlp.gate.weight`` is ``block_sparse_moe.gate.weight``.

    ``shapes``: HF name -> shape, as the checkpoint stores them. Returns (name -> shape, name ->
    the slab holding it) under the per-expert names; other tensors keep their name. Raises
    CheckpointError when a fused tensor is not 3-D or a checkpoint holds one expert in both
    layouts (``where`` names the source).
    """
    block, proj = _BLOCK[arch], _EXPERT_PROJ[arch]
    out: dict[str, tuple[int, ...]] = {}
    slabs: dict[str, Slab] = {}
    for name, shape in shapes.items():
        match = _FUSED.match(name)
        if match is None or (arch == "qwen2_moe" and match.group(2) == "gate.weight"):
            out[name], slabs[name] = shape, Slab(name)  # not fused, or Qwen2-MoE's router
            continue
        layer, part = f"{match.group(1)}{block}", match.group(2)
        if part != "gate.weight" and len(shape) != 3:
            raise CheckpointError(f"{where}: {name} has shape {shape}; fused experts are 3-D")
        pieces: dict[str, tuple[tuple[int, ...], Slab]]
        if part == "gate.weight":
            pieces = {f"{layer}.gate.weight": (shape, Slab(name))}
        elif part == "experts.down_proj":
            pieces = {
                f"{layer}.experts.{e}.{proj['w2']}.weight": (shape[1:], Slab(name, e))
                for e in range(shape[0])
            }
        else:
            gate = (shape[1] + 1) // 2  # the rows torch.chunk(2) gives the first half
            pieces = {}
            for e in range(shape[0]):
                pieces[f"{layer}.experts.{e}.{proj['w1']}.weight"] = (
                    (gate, shape[2]), Slab(name, e))
                pieces[f"{layer}.experts.{e}.{proj['w3']}.weight"] = (
                    (shape[1] - gate, shape[2]), Slab(name, e, row=gate))
        if twice := sorted(set(pieces) & set(shapes)):
            raise CheckpointError(f"{where}: {twice[0]} is stored both alone and inside {name}")
        for piece, (piece_shape, slab) in pieces.items():
            out[piece], slabs[piece] = piece_shape, slab
    return out, slabs
