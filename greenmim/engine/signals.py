"""Graceful stop on SIGTERM / SIGINT / SIGUSR1 (preemption by SLURM, Kubernetes, Ctrl-C).

The first signal only sets a flag; the trainer notices it after the current optimizer step, all
ranks agree on it (an all-reduce), a checkpoint is written and the process exits with
``128 + signum`` (see :class:`~greenmim.engine.errors.Preempted`). A second signal restores the
default action and re-raises itself, so the process dies at once.

Data-loader workers ignore these signals (:func:`ignore_stop_signals` as ``worker_init_fn``): a
Ctrl-C reaches the whole process group and would otherwise kill the workers under the main
process while it is finishing its step; the workers exit with their parent.
"""
from __future__ import annotations

import functools
import logging
import os
import signal
from typing import Callable, Dict, Optional

log = logging.getLogger("greenmim")

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class StopSignals:
    """Installs the stop-signal handlers while active (a context manager); ``requested`` holds the
    first signal's number, or None. Handlers can only be installed from the main thread; elsewhere
    (e.g. a trainer run inside a worker thread) this is a no-op and signals keep their defaults."""

    def __init__(self):
        self.requested: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.requested is not None:
            # second signal: give up at once with the default action (the process dies of the signal)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = signum
        log.warning("received %s: finishing the current step, then writing a checkpoint and exiting "
                    "(send it again to exit at once)", signal.Signals(signum).name)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` body: this process ignores the stop signals (its parent handles them)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def with_ignored_stop_signals(worker_init_fn: Optional[Callable[[int], None]]) -> Callable[[int], None]:
    """A ``worker_init_fn`` that ignores the stop signals, then runs ``worker_init_fn``: :func:`ignore_stop_signals`
    itself when there is none (or it is that already), else a :func:`functools.partial` of
    :func:`ignore_stop_signals_then` (picklable: workers may be spawned, not forked)."""
    if worker_init_fn is None or worker_init_fn is ignore_stop_signals:
        return ignore_stop_signals
    return functools.partial(ignore_stop_signals_then, worker_init_fn)


def ignore_stop_signals_then(worker_init_fn: Callable[[int], None], worker_id: int) -> None:
    """:func:`ignore_stop_signals`, then the loader's own ``worker_init_fn(worker_id)``."""
    ignore_stop_signals(worker_id)
    worker_init_fn(worker_id)
