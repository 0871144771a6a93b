"""Config: TOML + overrides precedence, types, and the printed config round trip."""

from __future__ import annotations

import pytest

from plait.config import build_config, to_toml
from plait.errors import ConfigError
from plait.train.optim import lr_factor


def test_toml_then_cli_overrides(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[train]\nsteps = 50\nlr = 1e-3\n[model]\nqkv_bias = true\n[data]\nsource = "x.jsonl"\n')
    cfg = build_config(str(path), [("train.steps", "7"), ("data.doc_mask", "false")])
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-3 and cfg.model.qkv_bias is True
    assert cfg.data.source == "x.jsonl" and cfg.data.doc_mask is False


def test_printed_config_round_trips(tmp_path):
    cfg = build_config(overrides=[("train.sample_prompt", 'He said "hi"\\'), ("train.lr", "2e-4")])
    path = tmp_path / "printed.toml"
    path.write_text(to_toml(cfg))
    assert build_config(str(path)) == cfg


def test_int_field_rejects_float_and_bool():
    with pytest.raises(ConfigError, match="train.steps"):
        build_config(values={"train.steps": 2.5})
    with pytest.raises(ConfigError, match="train.steps"):
        build_config(values={"train.steps": True})


def test_section_must_be_a_table(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("train = 3\n")
    with pytest.raises(ConfigError, match="section"):
        build_config(str(path))


def test_hsdp_layout_must_fill_world():
    build_config(values={"parallel.nproc": 4, "parallel.dp_replicate": 2, "parallel.dp_shard": 2, "train.micro_batch": 2})
    with pytest.raises(ConfigError, match="dp_replicate"):
        build_config(values={"parallel.nproc": 4, "parallel.dp_replicate": 3})


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules(schedule):
    cfg = build_config(values={"train.steps": 100, "train.warmup_steps": 10, "train.schedule": schedule,
                               "train.min_lr_ratio": 0.1, "train.decay_fraction": 0.2}).train
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a <= b + 1e-12 for a, b in zip(factors[:10], factors[1:10]))  # warmup rises
    if schedule == "constant":
        assert factors[-1] == 1.0
    elif schedule == "cosine":
        assert factors[-1] == pytest.approx(0.1, abs=1e-3) and factors[50] < 0.9
    else:
        assert factors[79] == 1.0 and factors[80] < 1.0 and factors[-1] == pytest.approx(0.1)


def test_readme_config_reference_is_current():
    """The README's config table is generated from the dataclasses; regenerate it on change."""
    import pathlib

    from plait.config import reference_markdown

    text = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "\n<!-- config-reference:end -->"
    assert text[text.index(start) + len(start) : text.index(end)] == reference_markdown()


def test_link_emulation_values():
    from plait.config import link_emulation, parse_link_values
    from plait.parallel.dims import MESH_DIMS

    assert link_emulation(build_config()) == ({}, {})  # off by default: the trainer resets it
    cfg = build_config(overrides=[("comm.emulate_bandwidth", "12.5e6"),
                                  ("comm.emulate_latency", "dp_replicate=0.02, dp=0")])
    assert link_emulation(cfg) == ({"*": 12.5e6}, {"dp_replicate": 0.02, "dp": 0.0})
    assert parse_link_values("emulate_bandwidth", " dp_replicate=1e8,tp=2e9 ") == {"dp_replicate": 1e8, "tp": 2e9}
    assert parse_link_values("emulate_bandwidth", "edp=1,ep=1,dp_cp=1,dp_shard_cp=1,cp=1,world=1,other=1")
    assert parse_link_values("emulate_latency", "  ") == {}
    assert parse_link_values("emulate_bandwidth", "dp=1e9,*=12.5e6") == {"dp": 1e9, "*": 12.5e6}
    for dim in MESH_DIMS:
        assert parse_link_values("emulate_latency", f"{dim}=0") == {dim: 0.0}


@pytest.mark.parametrize("name,value,needle", [
    ("emulate_bandwidth", "x=abc", "unknown mesh dim 'x'"),
    ("emulate_bandwidth", "dp=abc", "'abc' is not a number"),
    ("emulate_bandwidth", "0", "0 is not a finite number > 0"),
    ("emulate_bandwidth", "dp=1e6,dp=2e6", "'dp' is given twice"),
    ("emulate_bandwidth", "1e6,tp=2e6", "unknown mesh dim '1e6'"),
    ("emulate_latency", "-0.1", "-0.1 is not a finite number >= 0"),
    ("emulate_latency", "tp=inf", "inf is not a finite number >= 0"),
    ("emulate_latency", "tp=nan", "nan is not a finite number >= 0"),
])
def test_link_emulation_rejects(name, value, needle):
    with pytest.raises(ConfigError) as err:
        build_config(overrides=[(f"comm.{name}", value)])
    text = str(err.value)
    assert text.startswith(f"comm.{name} = {value!r}: {needle};") and "dp_replicate" in text and "\n" not in text
