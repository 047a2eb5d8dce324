"""Errors caused by user input (configs, data, paths), reported as one line by the command-line tools.

Anything raised as a :class:`UserError` is a mistake the user can fix; the message must say what
is wrong and how to fix it. Other exceptions are bugs and keep their traceback.
"""
from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input; ``str(err)`` is a one-line message that names the fix."""


class ConfigError(UserError):
    """An invalid configuration value or combination."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf and ``trainer.nonfinite=stop``; the last good checkpoint is kept."""


def one_line(err: BaseException) -> str:
    """The user-facing line of ``err``.

    Exceptions re-raised by a DataLoader worker carry the worker traceback in their message; the
    original message is its last line, after ``module.Class: ``.
    """
    text = str(err).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    line = lines[-1].strip() if lines else type(err).__name__
    name = type(err).__name__
    for prefix in (f"{type(err).__module__}.{name}: ", f"{name}: "):
        if line.startswith(prefix):
            line = line[len(prefix):]
    return line
