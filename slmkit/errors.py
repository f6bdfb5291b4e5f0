"""User-facing errors.

Every failure caused by user input is an :class:`SlmError`: one sentence that names the
input and says how to fix it. The CLI prints it on one line to stderr and exits with code 2,
without a traceback (``--debug`` shows one). Anything that is *not* an ``SlmError`` is a bug
in slmkit and keeps its traceback.
"""

from __future__ import annotations


class SlmError(Exception):
    """Base class for errors the user can fix. ``str(err)`` is the whole message."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ModelLoadError(SlmError):
    """A model directory or hub id cannot be loaded (missing, corrupt, unsafe, unsupported)."""


class ConfigError(SlmError):
    """An option, preset, override or recipe field is invalid."""


class DataError(SlmError):
    """A corpus, task file or data set is missing, empty or malformed."""


class OutputError(SlmError):
    """An output location cannot be written (exists, missing parent, not writable)."""


def validated(model_cls, **kwargs):
    """``model_cls(**kwargs)`` for a pydantic config, with its first validation error turned
    into one ConfigError sentence naming the flag (``Invalid --seq-len: ...``)."""
    from pydantic import ValidationError

    try:
        return model_cls(**kwargs)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err.get("loc", ()))
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        msg = msg.rstrip(".")
        if not field:                       # a check across fields: its message says it all
            raise ConfigError(f"{msg}.") from None
        raise ConfigError(f"Invalid --{field.replace('_', '-')}: {msg}.") from None
