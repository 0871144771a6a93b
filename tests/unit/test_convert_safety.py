"""``plait convert`` and ``save_pretrained`` touch only the files plait writes, inside the
destination, and a bad config.json or an unwritable destination stops with one line."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import plait
from plait.checkpoint import hf
from plait.checkpoint.store import load_model_checkpoint, save_model_checkpoint
from plait.cli import main
from plait.config import JobConfig, ModelConfig, TrainConfig
from plait.errors import CheckpointError
from plait.models.llama import build_model

TINY = ModelConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, ffn_dim=12, max_seq_len=64)
HF_TINY = dict(
    architectures=["LlamaForCausalLM"],
    vocab_size=16,
    hidden_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=12,
    max_position_embeddings=64,
)
USER_FILE = b"the user's own bytes\n"


def plait_checkpoint(path) -> str:
    save_model_checkpoint(build_model(TINY), JobConfig(model=TINY, train=TrainConfig(seq_len=32)), str(path))
    return str(path)


def hf_folder(path) -> str:
    hf.save_pretrained(build_model(TINY), str(path))
    return str(path)


def cli(*args: str) -> tuple[int, str]:
    """Run ``plait`` in this process; returns (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(args))
    return code, err.getvalue()


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("plait: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def user_file(path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(USER_FILE)
    return str(path)


# ---------------------------------------------------------------------------------------------
# only plait's own files, only inside the destination


@pytest.mark.parametrize("shard", ["../victim", "../victim.safetensors", "ABS", "tokenizer.json", ".."])
def test_index_never_names_a_file_to_delete(tmp_path, shard):
    victim = user_file(tmp_path / ("victim.safetensors" if "safetensors" in shard else "victim"))
    dst = tmp_path / "dst"
    tokenizer = user_file(dst / "tokenizer.json")
    shard = victim if shard == "ABS" else shard
    index = dst / hf.INDEX_FILE
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": shard}}))
    with pytest.raises(CheckpointError, match="remove the index yourself") as info:
        hf.save_pretrained(build_model(TINY), str(dst))
    assert "\n" not in str(info.value)
    assert open(victim, "rb").read() == USER_FILE and open(tokenizer, "rb").read() == USER_FILE
    assert sorted(os.listdir(dst)) == [hf.INDEX_FILE, "tokenizer.json"]  # nothing written
    assert sorted(os.listdir(tmp_path)) == sorted(["dst", os.path.basename(victim)])


def test_stale_shards_inside_are_replaced_and_user_files_kept(tmp_path):
    dst = tmp_path / "dst"
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name in shards:
        user_file(dst / name)
    tokenizer = user_file(dst / "tokenizer.json")
    weight_map = {"a": shards[0], "b": shards[1]}
    (dst / hf.INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    hf.save_pretrained(build_model(TINY), str(dst))  # Python: overwrites plait's own files
    assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert open(tokenizer, "rb").read() == USER_FILE
    assert hf.from_pretrained(str(dst)).cfg.dim == TINY.dim


def test_a_users_dst_tmp_survives(tmp_path):
    src = hf_folder(tmp_path / "hf")
    dst = str(tmp_path / "dst")
    keep = user_file(tmp_path / "dst.tmp" / "notes.txt")
    assert cli("convert", src, dst)[0] == 0
    assert open(keep, "rb").read() == USER_FILE
    load_model_checkpoint(dst)
    assert sorted(os.listdir(tmp_path)) == ["dst", "dst.tmp", "hf"]  # no temp folder left behind


def test_plait_to_hf_asks_before_writing_into_a_users_folder(tmp_path):
    src = plait_checkpoint(tmp_path / "ckpt")
    dst = tmp_path / "dst"
    config, tokenizer = user_file(dst / "config.json"), user_file(dst / "tokenizer.json")
    assert_one_line(*cli("convert", src, str(dst)), "already exists", "--force")
    assert sorted(os.listdir(dst)) == ["config.json", "tokenizer.json"]
    assert open(config, "rb").read() == USER_FILE
    assert cli("convert", src, str(dst), "--force")[0] == 0
    assert json.loads(open(config).read())["architectures"] == ["LlamaForCausalLM"]
    assert open(tokenizer, "rb").read() == USER_FILE
    assert hf.from_pretrained(str(dst)).cfg.dim == TINY.dim


def test_hf_to_plait_into_a_non_empty_folder_needs_force(tmp_path):
    src = hf_folder(tmp_path / "hf")
    dst = tmp_path / "dst"
    readme = user_file(dst / "README.md")
    assert_one_line(*cli("convert", src, str(dst)), "already exists", "--force")
    assert os.listdir(dst) == ["README.md"]
    assert cli("convert", src, str(dst), "--force")[0] == 0
    assert open(readme, "rb").read() == USER_FILE
    assert load_model_checkpoint(str(dst))[1].model.dim == TINY.dim
    assert cli("convert", src, str(dst), "--force")[0] == 0  # again, over its own checkpoint
    load_model_checkpoint(str(dst))
    assert sorted(os.listdir(tmp_path)) == ["dst", "hf"]


def test_destination_that_is_a_file_is_refused_even_with_force(tmp_path):
    src = hf_folder(tmp_path / "hf")
    dst = user_file(tmp_path / "dst")
    assert_one_line(*cli("convert", src, dst, "--force"), "is not a folder")
    assert open(dst, "rb").read() == USER_FILE


# ---------------------------------------------------------------------------------------------
# a destination that cannot be written


def test_destination_below_a_file_from_a_real_process(tmp_path):
    src = hf_folder(tmp_path / "hf")
    blocker = user_file(tmp_path / "file")
    root = os.path.dirname(os.path.dirname(os.path.abspath(plait.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    for dst in (os.path.join(blocker, "dst"), os.path.join(blocker, "a", "b", "dst")):
        proc = subprocess.run([sys.executable, "-m", "plait", "convert", src, dst],
                              capture_output=True, text=True, env=env, timeout=300)
        assert_one_line(proc.returncode, proc.stderr, "is a file, not a folder")
    assert sorted(os.listdir(tmp_path)) == ["file", "hf"]


def test_plait_to_hf_below_a_file(tmp_path):
    src = plait_checkpoint(tmp_path / "ckpt")
    user_file(tmp_path / "file")
    assert_one_line(*cli("convert", src, str(tmp_path / "file" / "new" / "dst")), "is a file")
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "file"]


@pytest.mark.parametrize("direction", ["hf_to_plait", "plait_to_hf"])
def test_write_failure_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, direction):
    """An OS error while writing (a full disk, a read-only mount that root's os.access cannot
    see) is one line, and even the parent folders the write created are gone."""
    src = hf_folder(tmp_path / "hf") if direction == "hf_to_plait" else plait_checkpoint(tmp_path / "hf")
    writer = "save_model_checkpoint" if direction == "hf_to_plait" else "save_file"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf, writer, disk_full)
    assert_one_line(*cli("convert", src, str(tmp_path / "new" / "deeper" / "dst")), "No space left")
    assert os.listdir(tmp_path) == ["hf"]


def test_read_only_parent(tmp_path, monkeypatch):
    """os.access: a real chmod when not root (root writes anyway), else the answer a read-only
    mount gives."""
    src = hf_folder(tmp_path / "hf")
    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() == 0:
        monkeypatch.setattr(hf.os, "access", lambda path, mode: os.path.realpath(path) != os.path.realpath(parent))
    else:
        parent.chmod(0o500)
    try:
        assert_one_line(*cli("convert", src, str(parent / "dst")), "read-only")
    finally:
        parent.chmod(0o700)
    assert os.listdir(parent) == []


# ---------------------------------------------------------------------------------------------
# a bad config.json

REQUIRED_INTS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]
OPTIONAL_INTS = ["num_key_value_heads", "max_position_embeddings"]
FLOATS = ["rms_norm_eps", "rope_theta", "initializer_range"]
MISSING = object()
NOT_AN_INT = st.one_of(
    st.integers(max_value=0), st.floats(allow_nan=True), st.booleans(), st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
)
NOT_A_SIZE = st.one_of(st.none(), st.just(MISSING), NOT_AN_INT)
NOT_POSITIVE = st.one_of(
    st.floats(max_value=0.0), st.sampled_from([float("nan"), float("inf")]), st.integers(max_value=0),
    st.booleans(), st.text(max_size=5),
)


def bad_fields():
    return st.one_of(
        st.tuples(st.sampled_from(REQUIRED_INTS), NOT_A_SIZE),
        st.tuples(st.sampled_from(OPTIONAL_INTS), NOT_AN_INT),
        st.tuples(st.sampled_from(FLOATS), NOT_POSITIVE),
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad_fields())
def test_bad_numeric_field_is_a_one_line_checkpoint_error(field_and_value):
    field, value = field_and_value
    config = dict(HF_TINY)
    if value is MISSING:
        del config[field]
    else:
        config[field] = value
    with pytest.raises(CheckpointError) as info:
        hf.config_from_hf(config)
    message = str(info.value)
    assert field in message and "\n" not in message


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hidden_size=8, num_attention_heads=3), "hidden_size = 8 is not divisible by num_attention_heads = 3"),
        (dict(num_key_value_heads=3, num_attention_heads=4), "num_attention_heads = 4 is not divisible"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 0}), "rope_scaling.factor = 0"),
        (dict(rope_scaling="llama3"), "rope_scaling = 'llama3'"),
        (dict(architectures=["MixtralForCausalLM"], num_local_experts=0, num_experts_per_tok=1), "num_local_experts = 0"),
        (dict(architectures=["MixtralForCausalLM"], num_local_experts=4, num_experts_per_tok=0), "num_experts_per_tok = 0"),
        (dict(architectures=["MixtralForCausalLM"], num_experts_per_tok=1), "lacks the field 'num_local_experts'"),
    ],
)
def test_inconsistent_config_is_a_one_line_checkpoint_error(change, message):
    with pytest.raises(CheckpointError, match=message) as info:
        hf.config_from_hf({**HF_TINY, **change})
    assert "\n" not in str(info.value)


def test_bad_config_through_the_cli(tmp_path):
    src = hf_folder(tmp_path / "hf")
    config = json.loads(open(os.path.join(src, "config.json")).read())
    json.dump(dict(config, num_attention_heads=0), open(os.path.join(src, "config.json"), "w"))
    code, err = cli("convert", src, str(tmp_path / "dst"))
    assert_one_line(code, err, "config.json", "num_attention_heads = 0")
    assert sorted(os.listdir(tmp_path)) == ["hf"]
