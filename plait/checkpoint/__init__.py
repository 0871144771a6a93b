"""Checkpoints: everything plait writes to disk to resume, share or convert a model.

This package owns saving and loading training checkpoints (torch DCP shards, per-rank state,
the resolved config) and model-only checkpoints, with their manifest of sizes and CRC32s (:mod:`.manifest`) and
``checkpoint.init_from`` (:mod:`.store`; each rank sums the files it writes as it writes
them, :mod:`.checksums`), the background save of ``checkpoint.async`` (:mod:`.async_save`,
its reused CPU copy in :mod:`.staging`); Hugging Face ``config.json`` + safetensors folders
in and out, and ``plait convert`` (:mod:`.hf`, :mod:`.hf_mapping`, :mod:`.hf_moe`, with the config values
checked in :mod:`.hf_fields`), a Hugging Face folder as a weight source that reads any block of a
parameter alone (:mod:`.hf_source`, through the placements of :mod:`.hf_placement`), DCP saves
that pull each tensor from such a source as it is written (:mod:`.pull_save`); and
crash-safe atomic writes of files and folders, also used by the data caches (:mod:`.atomic`).

Opening a checkpoint runs no code from it: DCP's ``.metadata`` pickle is read by an unpickler
that builds only DCP's metadata types, and its non-tensor values and the per-rank state files
with ``torch.load(weights_only=True)`` (:mod:`.safe_dcp`); Hugging Face weights are read with
safetensors only (pickled ``.bin``/``.pt`` files are refused).
"""
