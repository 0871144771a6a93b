"""Hugging Face weights straight into shards: a random Llama and a Qwen2-MoE written by
transformers (sharded safetensors with an index) load into FSDP, TP × DP, PP × DP and EP
layouts on 4 ranks, each rank reading only its own slices. Gathered weights equal the
checkpoint exactly; the sharded model's logits equal transformers' within 1e-5 (fp32); and
``checkpoint.init_from`` gives the trainer the same weights.

One spawned group of 4 ranks runs every case.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

transformers = pytest.importorskip("transformers")
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from plait.checkpoint.hf_mapping import config_from_hf, state_dict_from_hf  # noqa: E402
from plait.checkpoint.hf_source import HFWeights  # noqa: E402
from plait.checkpoint.store import full_model_state  # noqa: E402
from plait.launch import spawn  # noqa: E402
from plait.parallel.dims import ParallelDims  # noqa: E402
from plait.parallel.parallelize import parallelize_llama  # noqa: E402
from plait.train.trainer import Trainer  # noqa: E402
from tests.parallel.harness import job, write_corpus  # noqa: E402

TOL = 1e-5
SHAPE = dict(vocab_size=300, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)
MODELS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, SHAPE),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(SHAPE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                       shared_expert_intermediate_size=80, norm_topk_prob=False)),
}
LAYOUTS = {
    "fsdp4": {},
    "tp2_dp2": {"parallel.tp": 2},
    "pp2_dp2": {"parallel.pp": 2},
}
MOE_LAYOUTS = {"ep2_dp4": {"parallel.ep": 2}}
BATCH = {"train.global_batch": 8, "train.micro_batch": 1}


def write_hf(kind: str, folder: str) -> str:
    """A seeded random transformers model of ``kind`` with norms, biases and routers moved off
    their initial values (a mixup of ones or zeros would not show), saved in small shards."""
    config_cls, model_cls, values = MODELS[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**values)).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "bias", "gate.weight")):
                param.add_(torch.randn_like(param) * 0.5)
    path = os.path.join(folder, kind)
    model.save_pretrained(path, max_shard_size="40KB")
    return path


def model_values(path: str) -> dict:
    """The job's ``model.*`` values for the checkpoint at ``path``."""
    cfg = HFWeights(path).cfg
    return {f"model.{f.name}": getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def input_ids() -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))


def load_everywhere(workdir: str, paths: dict[str, str]) -> dict:
    """Inside a spawned rank: every (model, layout) built from the checkpoint; rank 0 returns
    the gathered weights and, without a pipeline, the sharded model's logits."""
    world, out = dist.get_world_size(), {}
    for kind, path in paths.items():
        layouts = {**LAYOUTS, **(MOE_LAYOUTS if kind != "llama" else {})}
        for name, values in layouts.items():
            cfg = job(workdir, f"{kind}_{name}", **{"parallel.nproc": world, **BATCH, **model_values(path), **values})
            dims = ParallelDims.from_config(cfg, world)
            dims.build_mesh("cpu")
            parts, _ = parallelize_llama(cfg, dims, torch.device("cpu"), HFWeights(path))
            state = full_model_state(parts, dims.group("pp") if dims.pp_enabled else None)
            logits = None
            if not dims.pp_enabled:
                with torch.no_grad():
                    logits = parts[0].eval()(input_ids())
                logits = logits.full_tensor() if isinstance(logits, DTensor) else logits
            if dist.get_rank() == 0:
                # numpy: tensors would travel back as shared memory of a process about to exit.
                out[(kind, name)] = {"state": {k: v.numpy().copy() for k, v in state.items()},
                                     "logits": None if logits is None else logits.numpy().copy()}
        # The trainer, given the folder as checkpoint.init_from, starts from the same weights.
        cfg = job(workdir, f"{kind}_trainer", **{"parallel.nproc": world, **BATCH, **model_values(path),
                                                 "checkpoint.init_from": path})
        state = full_model_state(Trainer(cfg).parts)
        if dist.get_rank() == 0:
            out[(kind, "trainer")] = {"state": {k: v.numpy().copy() for k, v in state.items()}, "logits": None}
    return out


def checkpoint_state(path: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors read whole, under plait's names: the independent reference."""
    tensors = {}
    for file in glob.glob(os.path.join(path, "*.safetensors")):
        tensors.update(load_file(file))
    with open(os.path.join(path, "config.json")) as fh:
        hf_config = json.load(fh)
    return state_dict_from_hf(tensors, config_from_hf(hf_config), architecture=hf_config["model_type"])


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("hf_shards"))
    write_corpus(folder)
    paths = {kind: write_hf(kind, folder) for kind in MODELS}
    for path in paths.values():  # sharded, with an index: each rank reads slices of several files
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
        assert len(glob.glob(os.path.join(path, "*.safetensors"))) > 3
    return paths, spawn(load_everywhere, 4, (folder, paths))[0]


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_gathered_weights_equal_the_checkpoint(loaded, kind):
    paths, got = loaded
    want = checkpoint_state(paths[kind])
    cases = [name for (k, name) in got if k == kind]
    assert len(cases) == len(LAYOUTS) + (len(MOE_LAYOUTS) if kind != "llama" else 0) + 1
    for name in cases:
        state = got[(kind, name)]["state"]
        assert sorted(state) == sorted(want), (kind, name)
        for key, tensor in want.items():
            assert torch.equal(torch.from_numpy(state[key]), tensor), f"{kind} {name}: {key}"


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_sharded_logits_equal_transformers(loaded, kind):
    paths, got = loaded
    reference = getattr(transformers, MODELS[kind][1].__name__).from_pretrained(paths[kind]).float().eval()
    with torch.no_grad():
        expected = reference(input_ids()).logits
    checked = 0
    for (k, name), row in got.items():
        if k != kind or row["logits"] is None:
            continue
        logits = torch.from_numpy(row["logits"])
        assert logits.shape == expected.shape, (kind, name)
        assert (logits - expected).abs().max().item() <= TOL, (kind, name)
        checked += 1
    assert checked >= 2
