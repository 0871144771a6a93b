"""Checked reads of the numeric fields of a Hugging Face ``config.json``.

A config.json is user input: a field may be missing, null, a string, a bool, a fraction, zero
or negative. Each reader here returns the value with its type, or raises CheckpointError with
one line naming the field, the value and what is allowed, before any tensor is read or built.
"""

from __future__ import annotations

import math
from typing import Any

from plait.errors import CheckpointError

REQUIRED: Any = object()  # a default meaning "the field must be present"


def _present(hf: dict[str, Any], name: str, default: Any, label: str) -> bool:
    """Whether ``name`` has a value; absent or null is an error only when ``default`` is
    ``REQUIRED``."""
    if hf.get(name) is not None:
        return True
    if default is REQUIRED:
        raise CheckpointError(f"the config lacks the field '{label}{name}' (absent or null)")
    return False


def int_field(
    hf: dict[str, Any], name: str, minimum: int = 1, default: Any = REQUIRED, label: str = ""
) -> int:
    """``hf[name]`` as an int >= ``minimum`` (``label`` prefixes the name in the message, e.g.
    ``"rope_scaling."``). Absent or null gives ``default``, which may be None."""
    if not _present(hf, name, default, label):
        return default
    value = hf[name]
    # bool is an int subclass in Python, and true/false for a size is a mistake, not 1/0.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CheckpointError(f"{label}{name} = {value!r}; it must be an integer >= {minimum}")
    return value


def float_field(
    hf: dict[str, Any], name: str, default: Any = REQUIRED, label: str = ""
) -> float:
    """``hf[name]`` as a finite float > 0 (an int is accepted). Absent or null gives
    ``default``."""
    if not _present(hf, name, default, label):
        return default
    value = hf[name]
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is None or not math.isfinite(number) or number <= 0:
        raise CheckpointError(f"{label}{name} = {value!r}; it must be a finite number > 0")
    return float(number)
