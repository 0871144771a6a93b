"""``resilience.inject``: the text that describes an injected fault, parsed into an Injection.

``kind:key=value:...``; what each kind does is in ``plait.resilience.inject``, which runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.errors import ConfigError


INJECTIONS = ("crash", "hang", "hang_collective", "slow", "nan", "crash_sync", "crash_save")


@dataclass(frozen=True)
class Injection:
    kind: str
    rank: int
    step: int = 1
    factor: float = 1.0


def parse_injection(text: str) -> Injection | None:
    """The injection described by ``text`` (None when empty); ConfigError if malformed."""
    if not text.strip():
        return None
    kind, *fields = text.strip().split(":")
    allowed = f"use kind:rank=R:step=S with kind one of {', '.join(INJECTIONS)} (slow takes factor=F)"
    if kind not in INJECTIONS:
        raise ConfigError(f"resilience.inject = {text!r}: unknown fault '{kind}'; {allowed}")
    values: dict[str, str] = {}
    for item in fields:
        key, _, value = item.partition("=")
        if key not in ("rank", "step", "factor") or not value:
            raise ConfigError(f"resilience.inject = {text!r}: bad field {item!r}; {allowed}")
        values[key] = value
    try:
        injection = Injection(kind, int(values["rank"]), int(values.get("step", 1)), float(values.get("factor", 1.0)))
    except (KeyError, ValueError):
        raise ConfigError(f"resilience.inject = {text!r}: needs integer rank= (and step=); {allowed}") from None
    if injection.step < 1 or injection.rank < 0 or (kind == "slow" and injection.factor <= 1):
        raise ConfigError(f"resilience.inject = {text!r}: rank >= 0, step >= 1, slow factor > 1; {allowed}")
    return injection
