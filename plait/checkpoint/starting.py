"""``checkpoint.init_from``: where a fresh run's weights come from.

A Hugging Face folder becomes a weight source that each rank reads its own shards from
(:class:`plait.checkpoint.hf_source.HFWeights`); a plait checkpoint (or a run dir's latest
good one) is loaded by DCP into the materialized model, which reshards from any layout.
"""

from __future__ import annotations

from plait.checkpoint.hf import is_hf_checkpoint
from plait.checkpoint.hf_source import HFWeights
from plait.checkpoint.store import initial_weights
from plait.config import ModelConfig


def starting_weights(src: str, model_cfg: ModelConfig) -> HFWeights | str:
    """The checked source ``src`` names: a Hugging Face folder's ``HFWeights`` (headers read
    and matched against ``model_cfg``), else the verified plait checkpoint folder. Raises
    CheckpointError (one line) naming what does not fit."""
    if is_hf_checkpoint(src):
        weights = HFWeights(src)
        weights.check_model(model_cfg, "checkpoint.init_from")
        return weights
    return initial_weights(src, model_cfg)
