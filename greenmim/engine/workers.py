"""Ending DataLoader worker processes, on success and on error.

Loader workers ignore the stop signals (:func:`~greenmim.engine.signals.ignore_stop_signals`), so
that a Ctrl-C or a scheduler's SIGTERM to the whole process group leaves them running while the main
process finishes its step. That has a cost at exit: :mod:`multiprocessing`'s exit hook stops the
daemonic children still alive with SIGTERM, which they ignore, then waits for them forever. Workers
are left alive whenever an error ends a run while a loader iterator is open (a corrupt image under
``data.on_corrupt=error``: the iterator of a ``persistent_workers`` loader, or one held by the
error's traceback). Hence two measures:

* :func:`shutdown_loader_workers`: the trainer ends its training loader's workers when ``fit`` ends,
  however it ends (the DataLoader's own orderly shutdown);
* :func:`shutdown_open_loader_iterators` (an exit hook that runs before multiprocessing's): the same
  orderly shutdown for every loader iterator still open then (e.g. an evaluation loader interrupted
  by an error), so the process exits with its own code (2 for a data error) instead of hanging.
"""
from __future__ import annotations

import atexit
import gc
import multiprocessing.util  # noqa: F401 - registers multiprocessing's exit hook before ours (hooks run last-in first-out)
from typing import Any

from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter


def shutdown_loader_workers(loader: Any) -> None:
    """End the worker processes of ``loader``'s persistent iterator, if it has one (a DataLoader with
    ``persistent_workers=True``); a no-op otherwise."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is None:
        return
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    loader._iterator = None


def shutdown_open_loader_iterators() -> None:
    """Shut down the workers of every multi-process DataLoader iterator still alive (the exit hook;
    see the module docstring). A no-op for iterators already shut down."""
    for obj in gc.get_objects():
        if issubclass(type(obj), _MultiProcessingDataLoaderIter):  # type(): isinstance warns on some torch objects
            obj._shutdown_workers()


atexit.register(shutdown_open_loader_iterators)
