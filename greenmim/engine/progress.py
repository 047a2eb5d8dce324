"""Progress of work that takes more than a few seconds (feature extraction, evaluation, rendering).

:func:`progress` wraps an iterable and chooses, once, how to show how far it got:

* **on a terminal** (stderr is a TTY): a ``tqdm`` bar on stderr, removed when the work ends (the
  caller's own summary line follows it);
* **otherwise** (a log file, CI, ``nohup``, a pipe): an INFO line on the ``greenmim`` logger every
  :data:`LOG_EVERY_S` seconds, ``<what>: 120/400 batches (30%), 12 s, eta 0:00:28``, so a log
  shows the phase is alive without a bar's control characters.

Only rank 0 shows progress under DDP (other ranks iterate silently). Every long phase goes through
this one function, so the choice is made in one place.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

from .monitor import format_eta

log = logging.getLogger("greenmim")

T = TypeVar("T")

#: seconds between two progress lines when stderr is not a terminal
LOG_EVERY_S = 15.0


def interactive() -> bool:
    """Whether progress is drawn as a bar: stderr (where tqdm draws) is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def is_main_rank() -> bool:
    """Rank 0 of the process group, or of the launcher's ``RANK`` before the group is up."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def progress(items: Iterable[T], what: str, total: Optional[int] = None, unit: str = "batches",
             enabled: Optional[bool] = None) -> Iterator[T]:
    """Yield ``items``, showing progress as the module docstring says.

    Args:
        items: the work, e.g. a DataLoader.
        what: the phase, as the line starts (e.g. ``"features of 245 train images"``).
        total: the number of items; ``len(items)`` when it has one, else the lines show counts only.
        unit: what one item is, plural (``"batches"``, ``"images"``).
        enabled: show anything at all; default: on rank 0 only (:func:`is_main_rank`).
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if enabled is None:
        enabled = is_main_rank()
    if not enabled:
        yield from items
        return
    if interactive():
        from tqdm import tqdm

        yield from tqdm(items, desc=what, total=total, unit=f" {unit}", leave=False, dynamic_ncols=True)
        return
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= LOG_EVERY_S and (total is None or done < total):
            last = now
            log.info("%s", progress_line(what, done, total, unit, now - start))


def progress_line(what: str, done: int, total: Optional[int], unit: str, elapsed: float) -> str:
    """``<what>: <done>/<total> <unit> (<pct>%), <elapsed> s, eta h:mm:ss`` (counts only without a total)."""
    if not total:
        return f"{what}: {done} {unit}, {elapsed:.0f} s"
    eta = elapsed / max(done, 1) * (total - done)
    return f"{what}: {done}/{total} {unit} ({100 * done / total:.0f}%), {elapsed:.0f} s, eta {format_eta(eta)}"
