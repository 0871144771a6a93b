"""``[comm]`` link emulation values: bandwidth and latency per mesh dimension."""

from __future__ import annotations

import math

from plait.config.sections import JobConfig
from plait.errors import ConfigError


# The names comm.register_* gives process groups: dims.MESH_DIMS, the expert mesh's edp and ep,
# the flattened dp, dp_cp, dp_shard_cp and cp, and comm's own world and other.
LINK_DIMS = ("pp", "dp_replicate", "dp_shard", "cp_ring", "cp_ulysses", "tp", "edp", "ep",
             "dp", "dp_cp", "dp_shard_cp", "cp", "world", "other")


def parse_link_values(name: str, text: str) -> dict[str, float]:
    """``comm.<name>`` (``emulate_bandwidth`` in bytes/s > 0, ``emulate_latency`` in seconds
    >= 0) as {mesh dim: value}; key ``"*"`` (a single number, or ``*=value``) is every dim not
    named; {} when empty.
    Raises ConfigError naming the field, the value and what is allowed."""
    unit, bound = ("bytes/s", "> 0") if name == "emulate_bandwidth" else ("seconds", ">= 0")
    text = text.strip()
    if not text:
        return {}
    pairs = [part.partition("=")[::2] for part in text.split(",")] if "=" in text else [("*", text)]
    values: dict[str, float] = {}
    for dim, raw in pairs:
        dim = dim.strip()
        try:
            value = float(raw)
        except ValueError:
            problem = f"{raw.strip()!r} is not a number"
        else:
            ok = math.isfinite(value) and (value > 0 if bound == "> 0" else value >= 0)
            problem = "" if ok else f"{raw.strip()} is not a finite number {bound}"
        if dim != "*" and dim not in LINK_DIMS:
            problem = f"unknown mesh dim {dim!r}"
        elif dim in values:
            problem = f"{dim!r} is given twice"
        if problem:
            raise ConfigError(
                f"comm.{name} = {text!r}: {problem}; use one number of {unit} ({bound}) for every mesh dim, "
                f"or 'dim=value,...' with dims {', '.join(LINK_DIMS)} (or * for the dims not named)"
            )
        values[dim] = value
    return values


def link_emulation(cfg: JobConfig) -> tuple[dict[str, float], dict[str, float]]:
    """(bandwidth in bytes/s, latency in s) per mesh dim from ``[comm]``: what
    comm.configure_emulation takes; two empty dicts when emulation is off."""
    return (parse_link_values("emulate_bandwidth", cfg.comm.emulate_bandwidth),
            parse_link_values("emulate_latency", cfg.comm.emulate_latency))
