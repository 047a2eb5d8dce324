"""Command-line tools: ``greenmim-pretrain`` (Hydra), ``greenmim-visualize``, ``greenmim-export``.

:mod:`greenmim.cli.common` holds what every Hydra entry point shares (config -> engine objects,
one-line user errors), for the fine-tuning and detection CLIs too.

Importing this package (the first thing a console script or ``python -m greenmim.cli.X`` does,
before torch and Hydra load for seconds) installs a ``sys.excepthook`` for a Ctrl-C that escapes
to the top level: one line on stderr and exit 130 instead of a traceback through the imports.
Other exceptions go to the previous hook unchanged.

It also makes SIGINT raise ``KeyboardInterrupt`` when the process started with SIGINT ignored: a
non-interactive shell starts background commands that way (``cmd &`` in a script, ``nohup``), and
Python then leaves SIGINT ignored, so an explicit ``kill -INT`` during start-up did nothing while the
trainer, which installs its own SIGINT handler, honours it: the command ran on instead of exiting 130.
A terminal's Ctrl-C does not reach a background process group, so this only changes explicit signals.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C


def interrupted_line(prog: str) -> str:
    """What a Ctrl-C outside the training steps prints (training steps turn it into a checkpoint)."""
    return (f"{prog}: interrupted (Ctrl-C) before training started or outside training steps; checkpoints already "
            "written are kept: run the same command again (with resume=auto to continue a training run)")


def _prog() -> str:
    """The command's name: the console script's, or ``greenmim-X`` for ``python -m greenmim.cli.X``
    (whose ``sys.argv[0]`` is still ``-m`` while the module imports)."""
    argv0 = sys.argv[0] if sys.argv else ""
    orig = list(getattr(sys, "orig_argv", []))
    if argv0 in ("", "-m", "-c") and "-m" in orig[:-1]:
        name = orig[orig.index("-m") + 1].rsplit(".", 1)[-1]
    else:
        name = Path(argv0 or "greenmim").stem
    return name if name.startswith("greenmim") else f"greenmim-{name}"


def _interrupt_hook(previous):
    def hook(exc_type, exc, tb):
        if not issubclass(exc_type, KeyboardInterrupt):
            return previous(exc_type, exc, tb)
        sys.stdout.flush()
        print(interrupted_line(_prog()), file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED)  # the interpreter would otherwise re-raise SIGINT after the hook

    hook.greenmim = True
    return hook


if not getattr(sys.excepthook, "greenmim", False):
    sys.excepthook = _interrupt_hook(sys.excepthook)


def _honour_sigint() -> None:
    """SIGINT raises ``KeyboardInterrupt`` even if this process inherited it ignored (see the module docstring)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


_honour_sigint()
