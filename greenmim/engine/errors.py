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


class Preempted(RuntimeError):
    """A stop signal (SIGTERM, SIGINT, SIGUSR1) ended training after a checkpoint was written.

    ``exit_code`` is ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1), the
    code a shell reports for a process killed by that signal, so schedulers see the usual status.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


#: exit codes of the command-line tools (documented in the README's "Exit codes" table)
EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3


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
