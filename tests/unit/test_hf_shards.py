"""Hugging Face folders as a weight source (any block of any parameter, read alone), and
``plait convert`` streaming tensor by tensor with sharded Hugging Face output."""

from __future__ import annotations

import json
import os
import re
import weakref

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

transformers = pytest.importorskip("transformers")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from plait.checkpoint import hf, hf_source  # noqa: E402
from plait.checkpoint.store import initial_weights, load_model_checkpoint  # noqa: E402
from plait.config import ModelConfig  # noqa: E402
from plait.errors import CheckpointError  # noqa: E402
from tests.unit.test_hf import make_hf  # noqa: E402
from tests.unit.test_hf_moe import make_hf_moe  # noqa: E402

SHARD = "20KB"  # small enough that every tiny model below is sharded


def hf_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the HF folder ``path`` (single file or shards), read whole."""
    files = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    return {name: t for f in files for name, t in load_file(os.path.join(path, f)).items()}


def write_sharded(tensors: dict[str, torch.Tensor], path, config: dict, shards: int = 3) -> str:
    """A hand-written sharded folder: ``tensors`` spread over ``shards`` files and an index."""
    os.makedirs(path, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (path / hf.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / hf.CONFIG_FILE).write_text(json.dumps(config))
    return str(path)


def fuse_experts(tensors: dict[str, torch.Tensor], arch: str, layers: int, experts: int) -> dict:
    """transformers' fused layout built by hand from per-expert tensors: gate_up_proj
    (experts, 2·hidden, dim) and down_proj per layer, Mixtral's router under mlp.gate."""
    block, (gate, down, up) = {
        "mixtral": ("block_sparse_moe", ("w1", "w2", "w3")),
        "qwen2_moe": ("mlp", ("gate_proj", "down_proj", "up_proj")),
    }[arch]
    out = dict(tensors)
    for i in range(layers):
        old = f"model.layers.{i}.{block}.experts"
        pop = lambda proj, e: out.pop(f"{old}.{e}.{proj}.weight")  # noqa: E731
        new = f"model.layers.{i}.mlp.experts"
        out[f"{new}.gate_up_proj"] = torch.stack(
            [torch.cat([pop(gate, e), pop(up, e)]) for e in range(experts)])
        out[f"{new}.down_proj"] = torch.stack([pop(down, e) for e in range(experts)])
        if arch == "mixtral":
            out[f"model.layers.{i}.mlp.gate.weight"] = out.pop(f"model.layers.{i}.{block}.gate.weight")
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    """kind -> (a sharded HF folder, plait's whole-tensor state dict of the same weights)."""
    root = tmp_path_factory.mktemp("hf")
    made = {}
    for kind, model in [
        ("llama", make_hf("llama")),
        ("qwen2-tied", make_hf("qwen2", tie_word_embeddings=True)),
        ("qwen2_moe", make_hf_moe("qwen2_moe")),
        ("mixtral", make_hf_moe("mixtral")),
    ]:
        path = str(root / kind)
        model.save_pretrained(path, max_shard_size=SHARD)
        assert os.path.isfile(os.path.join(path, hf.INDEX_FILE))
        weights = hf.HFWeights(path)
        sd = hf.state_dict_from_hf(hf_tensors(path), weights.cfg, architecture=weights.architecture)
        made[kind] = (path, sd)
    for kind in ("qwen2_moe", "mixtral"):  # the fused expert layout, written by hand
        path, sd = made[kind]
        cfg = hf.HFWeights(path).cfg
        fused = fuse_experts(hf_tensors(path), kind, cfg.n_layers, cfg.moe_experts)
        config = json.loads(open(os.path.join(path, hf.CONFIG_FILE)).read())
        made[f"{kind}-fused"] = (write_sharded(fused, root / f"{kind}-fused", config), sd)
    return made


KINDS = ["llama", "qwen2-tied", "qwen2_moe", "mixtral", "qwen2_moe-fused", "mixtral-fused"]


@st.composite
def regions(draw, shapes: dict[str, tuple[int, ...]]):
    """(parameter name, a random block of it: one slice(start, stop) per dimension)."""
    name = draw(st.sampled_from(sorted(shapes)))
    region = []
    for size in shapes[name]:
        start = draw(st.integers(0, size))
        region.append(slice(start, draw(st.integers(start, size))))
    return name, tuple(region)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_region_equals_the_whole_tensors_slice(folders, kind, data):
    path, sd = folders[kind]
    weights = hf.HFWeights(path)
    assert set(weights.placements) == set(sd)
    name, region = data.draw(regions({n: tuple(t.shape) for n, t in sd.items()}))
    got = weights(name, region)
    assert got.device.type == "cpu" and got.dtype == sd[name].dtype
    assert torch.equal(got, sd[name][region]), (name, region)


def test_fused_folder_really_is_fused(folders):
    for kind in ("qwen2_moe-fused", "mixtral-fused"):
        names = hf_tensors(folders[kind][0])
        assert any(n.endswith("experts.gate_up_proj") for n in names)
        assert not any(".experts.0." in n for n in names)


class Recorder:
    """Stands in for ``safe_open`` in hf_source: records every file opened and closed and
    every block read (tensor name, key), and with ``headers_only`` refuses any data read."""

    def __init__(self, monkeypatch, headers_only: bool = False):
        self.opened, self.closed, self.reads = [], [], []
        real = hf_source.safe_open
        recorder = self

        class Slice:
            def __init__(self, inner, name):
                self.inner, self.name = inner, name

            def get_shape(self):
                return self.inner.get_shape()

            def __getitem__(self, key):
                assert not headers_only, f"tensor data of {self.name} was read"
                recorder.reads.append((self.name, key))
                return self.inner[key]

        class Handle:
            def __init__(self, file, framework):
                self.file = file
                self.inner = real(file, framework=framework)
                recorder.opened.append(file)

            def __enter__(self):
                self.inner.__enter__()
                return self

            def __exit__(self, *exc):
                recorder.closed.append(self.file)
                return self.inner.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def get_slice(self, name):
                return Slice(self.inner.get_slice(name), name)

        monkeypatch.setattr(hf_source, "safe_open", Handle)


def test_only_the_regions_bytes_are_read_and_files_are_closed(folders, monkeypatch):
    weights = hf.HFWeights(folders["qwen2_moe"][0])
    fused = hf.HFWeights(folders["qwen2_moe-fused"][0])
    rec = Recorder(monkeypatch)
    name = "layers.1.feed_forward.experts.w3"  # up: (experts 4, hidden 48, dim 64)
    block = weights(name, (slice(1, 3), slice(8, 40), slice(0, 64)))
    assert block.shape == (2, 32, 64)
    assert [n for n, _ in rec.reads] == [f"model.layers.1.mlp.experts.{e}.up_proj.weight" for e in (1, 2)]
    assert sorted(rec.opened) == sorted(rec.closed)  # nothing stays mapped between calls
    rec.reads.clear()
    assert torch.equal(fused(name, (slice(1, 3), slice(8, 40), slice(0, 64))), block)
    # one read of the two experts, the up half's rows only (they follow the 48 gate rows)
    assert rec.reads == [("model.layers.1.mlp.experts.gate_up_proj", (slice(1, 3), slice(56, 88), slice(0, 64)))]
    assert sorted(rec.opened) == sorted(rec.closed)
    rec.reads.clear()
    assert fused(name, (slice(2, 2), slice(0, 48), slice(0, 64))).shape == (0, 48, 64)


def test_construction_reads_headers_only(folders, monkeypatch):
    Recorder(monkeypatch, headers_only=True)
    for kind in KINDS:
        weights = hf.HFWeights(folders[kind][0])
        assert weights.cfg.n_layers == 2


def damaged_copy(folders, tmp_path, kind="llama") -> tuple[str, dict]:
    """A copy of the sharded ``kind`` folder and its index's weight map."""
    src = folders[kind][0]
    dst = tmp_path / kind
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes(open(os.path.join(src, name), "rb").read())
    return str(dst), json.loads((dst / hf.INDEX_FILE).read_text())["weight_map"]


def one_line_error(path: str, match: str, monkeypatch) -> None:
    Recorder(monkeypatch, headers_only=True)  # refused before any tensor data is read
    with pytest.raises(CheckpointError, match=match) as info:
        hf.HFWeights(path)
    assert "\n" not in str(info.value)


def test_missing_shard(folders, tmp_path, monkeypatch):
    path, weight_map = damaged_copy(folders, tmp_path)
    shard = sorted(set(weight_map.values()))[-1]
    os.remove(os.path.join(path, shard))
    one_line_error(path, f"weight shard '.*{shard}' is missing", monkeypatch)


def test_misshaped_tensor(folders, tmp_path, monkeypatch):
    path, weight_map = damaged_copy(folders, tmp_path)
    file = os.path.join(path, weight_map["model.norm.weight"])
    save_file(dict(load_file(file), **{"model.norm.weight": torch.ones(65)}), file)
    one_line_error(path, r"model-.*safetensors': model\.norm\.weight has shape \(65,\), the config needs \(64,\)",
                   monkeypatch)


def test_missing_tensor(folders, tmp_path, monkeypatch):
    path, weight_map = damaged_copy(folders, tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    file = os.path.join(path, weight_map[name])
    save_file({k: v for k, v in load_file(file).items() if k != name}, file)
    one_line_error(path, f"lacks {name}, which the index lists", monkeypatch)
    index = {"weight_map": {k: v for k, v in weight_map.items() if k != name}}
    (tmp_path / "llama" / hf.INDEX_FILE).write_text(json.dumps(index))
    one_line_error(path, rf"missing tensors {name}", monkeypatch)


@pytest.mark.parametrize("shard", ["../model.safetensors", "/etc/passwd", "config.json", 3])
def test_index_pointing_outside_the_folder(folders, tmp_path, monkeypatch, shard):
    path, weight_map = damaged_copy(folders, tmp_path)
    index = {"weight_map": dict(weight_map, **{"model.norm.weight": shard})}
    (tmp_path / "llama" / hf.INDEX_FILE).write_text(json.dumps(index))
    one_line_error(path, "not a .safetensors file inside", monkeypatch)


def test_bad_regions_and_names(folders):
    weights = hf.HFWeights(folders["llama"][0])
    with pytest.raises(ValueError, match="outside"):
        weights("norm.weight", (slice(0, 65),))
    with pytest.raises(ValueError, match="needs 1 slices"):
        weights("norm.weight", (slice(0, 1), slice(0, 1)))
    with pytest.raises(KeyError):
        weights("output.bias", (slice(0, 1),))


def test_check_model(folders):
    weights = hf.HFWeights(folders["qwen2_moe"][0])
    weights.check_model(weights.cfg)
    unresolved = ModelConfig(**{**vars(weights.cfg), "vocab_size": 0, "max_seq_len": 64})
    weights.check_model(unresolved)  # vocab not resolved yet; sequence length free
    other = ModelConfig(**{**vars(weights.cfg), "dim": 32, "moe_experts": 8})
    with pytest.raises(CheckpointError, match=r"is a different model: dim 64 \(checkpoint\) vs 32; "
                                              r"moe_experts 4 \(checkpoint\) vs 8") as info:
        weights.check_model(other, what="model.init")
    assert str(info.value).startswith("model.init: '") and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# plait convert, streaming


@pytest.mark.parametrize("kind", ["llama", "qwen2-tied", "qwen2_moe", "mixtral-fused"])
def test_convert_round_trip_is_bit_exact_and_sharded(folders, tmp_path, monkeypatch, kind):
    src, sd = folders[kind]
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    hf.convert(src, ckpt)
    model, job = load_model_checkpoint(ckpt)  # what plait generate reads
    assert model.state_dict().keys() == sd.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert initial_weights(ckpt, job.model) == ckpt  # and checkpoint.init_from
    monkeypatch.setattr(hf, "SHARD_BYTES", 40_000)
    hf.convert(ckpt, back)
    files = sorted(os.listdir(back))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert hf.WEIGHTS_FILE not in files and hf.INDEX_FILE in files and len(shards) > 2
    index = json.loads(open(os.path.join(back, hf.INDEX_FILE)).read())
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:  # each shard within the bound, or one larger parameter (its experts)
        tensors = load_file(os.path.join(back, shard))
        one_parameter = len({re.sub(r"experts\.\d+\.", "experts.", n) for n in tensors}) == 1
        assert one_parameter or sum(t.nbytes for t in tensors.values()) <= 40_000
    written = hf_tensors(back)
    assert set(index["weight_map"]) == set(written)
    again = hf.HFWeights(back)
    assert all(torch.equal(again.read(k), v) for k, v in sd.items())
    if not kind.endswith("fused"):  # the same tensors transformers wrote, bit for bit
        original = hf_tensors(src)
        assert set(written) == set(original)
        assert all(torch.equal(written[k], v) for k, v in original.items())


def test_hf_to_plait_pulls_one_tensor_at_a_time(folders, tmp_path, monkeypatch):
    """DCP reads each weight from the source as it writes it: when a tensor is requested,
    at most the one before it is still alive, and each is requested once, whole."""
    src, sd = folders["qwen2_moe"]
    calls, alive = [], []
    real = hf_source.HFWeights.__call__

    def counting(self, name, region):
        alive.append(sum(ref() is not None for _, ref in calls))
        tensor = real(self, name, region)
        assert all(r.stop - r.start == n for r, n in zip(region, tensor.shape))
        # A numpy array holds the data: it lives while any tensor (a DCP view or detached
        # copy of the returned one) shares its storage, which a weakref on the tensor misses.
        data = tensor.numpy().copy()
        calls.append((name, weakref.ref(data)))
        return torch.from_numpy(data)

    monkeypatch.setattr(hf_source.HFWeights, "__call__", counting)
    hf.convert(src, str(tmp_path / "ckpt"))
    assert sorted(name for name, _ in calls) == sorted(sd)
    assert max(alive) <= 1


def test_sharded_and_single_replace_each_other(tmp_path, monkeypatch):
    """Writing sharded over a single file, and single over shards, leaves only the new
    weights (a stale model.safetensors would hide the index) and keeps the user's files."""
    model = hf.from_pretrained(make_hf_sharded(tmp_path / "src"))
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "tokenizer.json").write_text("{}")
    hf.save_pretrained(model, str(dst))
    assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors", "tokenizer.json"]
    monkeypatch.setattr(hf, "SHARD_BYTES", 40_000)
    hf.save_pretrained(model, str(dst))
    files = sorted(os.listdir(dst))
    assert hf.WEIGHTS_FILE not in files and hf.INDEX_FILE in files and "tokenizer.json" in files
    back = hf.from_pretrained(str(dst))
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    monkeypatch.setattr(hf, "SHARD_BYTES", 2**31)
    hf.save_pretrained(model, str(dst))
    assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors", "tokenizer.json"]


def make_hf_sharded(path) -> str:
    make_hf("llama").save_pretrained(str(path), max_shard_size=SHARD)
    return str(path)


def test_plait_to_hf_reads_one_shard_at_a_time(folders, tmp_path, monkeypatch):
    """plait -> HF reads the checkpoint once per output shard, each time only that shard's
    parameters, every parameter once."""
    src, sd = folders["llama"]
    ckpt = str(tmp_path / "ckpt")
    hf.convert(src, ckpt)
    reads = []
    real = hf.read_model_tensors
    monkeypatch.setattr(hf, "read_model_tensors", lambda folder, tensors: reads.append(list(tensors)) or real(folder, tensors))
    monkeypatch.setattr(hf, "SHARD_BYTES", 40_000)
    hf.convert(ckpt, str(tmp_path / "back"))
    shards = [f for f in os.listdir(tmp_path / "back") if f.endswith(".safetensors")]
    assert len(reads) == len(shards) > 2
    assert sorted(name for names in reads for name in names) == sorted(sd)
    for names in reads:
        assert len(names) == 1 or sum(sd[n].nbytes for n in names) <= 40_000


def test_force_over_a_larger_checkpoint_leaves_no_stale_shards(folders, tmp_path):
    """DCP writes one file per tensor: converting with --force over a checkpoint of more
    tensors removes its extra .distcp files, which would otherwise fail the manifest check."""
    dst = str(tmp_path / "dst")
    hf.convert(folders["qwen2_moe"][0], dst)
    hf.convert(folders["llama"][0], dst, force=True)
    model, _ = load_model_checkpoint(dst)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in folders["llama"][1].items())
