"""One candidate layout, and the ``--layout "tp=8,pp=2,..."`` text that fixes some of its fields.

Ranks are ordered like plait's DeviceMesh: tp innermost (neighbouring ranks, one node), then cp,
then dp (expert parallelism lives inside dp), and pp outermost.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.errors import ConfigError

PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble", "zbv", "dualpipev")
RECOMPUTE = ("none", "selective", "full")
INT_FIELDS = ("tp", "pp", "vpp", "dp", "cp", "ep", "mbs", "zero")
LAYOUT_KEYS = INT_FIELDS + ("recompute", "schedule")


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    vpp: int
    dp: int
    cp: int
    ep: int
    micro_batch: int
    zero: int
    recompute: str  # none | selective (attention core) | full (whole block)
    schedule: str  # one of spec.PP_SCHEDULES; "1f1b" when pp = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    def micro_batches(self, global_batch: int) -> int:
        """Micro-batches per pipeline per step."""
        return global_batch // (self.dp * self.micro_batch)

    def text(self) -> str:
        return (f"tp={self.tp},pp={self.pp},vpp={self.vpp},dp={self.dp},cp={self.cp},ep={self.ep},"
                f"mbs={self.micro_batch},zero={self.zero},recompute={self.recompute}")


def parse_layout(text: str) -> dict[str, int | str]:
    """``"tp=8,pp=2,recompute=full"`` -> {"tp": 8, "pp": 2, "recompute": "full"}; the fields left
    out are searched. Raises ConfigError on an unknown key or a bad value."""
    fixed: dict[str, int | str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.strip().partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in LAYOUT_KEYS:
            raise ConfigError(f"--layout {text!r}: '{part.strip()}' is not KEY=VALUE with KEY one of {', '.join(LAYOUT_KEYS)}")
        if key == "recompute":
            if value not in RECOMPUTE:
                raise ConfigError(f"--layout recompute={value!r}; choose one of {', '.join(RECOMPUTE)}")
            fixed[key] = value
        elif key == "schedule":
            if value not in PP_SCHEDULES:
                raise ConfigError(f"--layout schedule={value!r}; choose one of {', '.join(PP_SCHEDULES)}")
            fixed[key] = value
        else:
            if not value.isdigit() or int(value) < (0 if key == "zero" else 1):
                raise ConfigError(f"--layout {key}={value!r} must be an integer >= {0 if key == 'zero' else 1}")
            if key == "zero" and int(value) > 3:
                raise ConfigError(f"--layout zero={value} is out of range; ZeRO stages are 0 to 3")
            fixed[key] = int(value)
    return fixed
