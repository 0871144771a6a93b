"""The one exception type users see: bad input, reported as a single line with exit code 2."""


class PlaitError(Exception):
    """A problem with the user's input (config, data, checkpoint, files).

    The CLI prints ``plait: <message>`` on one line and exits with code 2; nothing else is
    written. Raise it with a message that names the field or file, the value, and what is
    allowed.
    """


class UsageError(PlaitError):
    """A command line that does not parse: an unknown flag, a missing value, an argument out of range."""


class ConfigError(PlaitError):
    """A config field is unknown, mistyped, out of range, or inconsistent with another."""


class DataError(PlaitError):
    """A data source or tokenizer cannot be read or is empty."""


class CheckpointError(PlaitError):
    """A checkpoint is missing, incomplete or corrupt."""


class NonFiniteError(RuntimeError):
    """Training met a NaN/Inf loss or gradient and ``resilience.on_nan = "rollback"``: the
    supervisor restarts from the last checkpoint (a single process stops here)."""
