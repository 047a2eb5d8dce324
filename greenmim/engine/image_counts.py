"""How many images a dataset skipped (unreadable) or converted to RGB, summed over loader workers.

A dataset of image files (:class:`~greenmim.data.datasets.ImageFiles`) owns an :class:`ImageCounts`:
a small int64 table in shared memory, one row per process that reads the dataset (row 0: the
process that built it; row ``1 + i``: DataLoader worker ``i``), so workers count without locks and
the main process reads the sums. While an item is read, :func:`counting` makes the dataset's counts
the ones :func:`note_conversion` adds to (``to_rgb`` calls it for every non-RGB image).

:class:`CountReport` turns the counts into one line per period (the trainer: per epoch; a frozen
evaluation: per feature extraction) instead of a line per image or per worker::

    epoch 2: skipped 2 unreadable image(s), e.g. /data/x/broken.jpg (data.on_corrupt=error stops instead);
    converted 14 image(s) to RGB: 12 P (palette), 2 L (greyscale)
"""
from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from typing import Iterator, List, Optional, Sequence

import torch
from torch.utils.data import get_worker_info

log = logging.getLogger("greenmim")

MODE_NAMES = {"P": "palette", "L": "greyscale", "LA": "greyscale+alpha", "RGBA": "RGB+alpha", "CMYK": "CMYK",
              "I": "32-bit integer", "I;16": "16-bit greyscale", "F": "float", "1": "1-bit", "YCbCr": "YCbCr", "PA": "palette+alpha"}
#: counted image modes; any other mode is counted as "other"
MODES = (*MODE_NAMES, "other")
#: rows of a table: the building process and up to ROWS - 1 loader workers (more share rows; counts may then race)
ROWS = 257
_SKIPPED, _EXAMPLE, _FIRST_MODE = 0, 1, 2  # columns: skipped, 1 + index of the last skipped item, one per mode

_active = threading.local()  # the ImageCounts of the item being read in this thread
_all: "weakref.WeakSet[ImageCounts]" = weakref.WeakSet()  # every ImageCounts built in this process


class ImageCounts:
    """The skipped and converted images of one dataset (see the module docstring).

    Args:
        paths: the dataset's files, to name an example of a skipped one (kept by reference).
    """

    def __init__(self, paths: Sequence[str]):
        self.paths = paths
        self.table = torch.zeros(ROWS, _FIRST_MODE + len(MODES), dtype=torch.int64).share_memory_()
        _all.add(self)

    @staticmethod
    def _row() -> int:
        info = get_worker_info()
        return 0 if info is None else 1 + info.id % (ROWS - 1)

    def skipped(self, index: int) -> None:
        """Count the unreadable item ``index`` (skipped: the dataset returned another one)."""
        row = self._row()
        self.table[row, _SKIPPED] += 1
        self.table[row, _EXAMPLE] = index + 1

    def converted(self, mode: str) -> None:
        """Count one image of PIL mode ``mode`` converted to RGB."""
        col = _FIRST_MODE + (MODES.index(mode) if mode in MODE_NAMES else len(MODES) - 1)
        self.table[self._row(), col] += 1

    @property
    def total_skipped(self) -> int:
        return int(self.table[:, _SKIPPED].sum())


@contextlib.contextmanager
def counting(counts: Optional[ImageCounts]) -> Iterator[None]:
    """Within the block, :func:`note_conversion` (this thread) counts into ``counts``."""
    previous = getattr(_active, "counts", None)
    _active.counts = counts
    try:
        yield
    finally:
        _active.counts = previous


def note_conversion(mode: str) -> bool:
    """Count a conversion of a ``mode`` image to RGB in the active counts; False when none is active
    (an image read outside a dataset, e.g. by ``greenmim-visualize``: the caller reports it itself)."""
    counts = getattr(_active, "counts", None)
    if counts is None:
        return False
    counts.converted(mode)
    return True


class CountReport:
    """One line for what every dataset of this process skipped and converted since the last
    :meth:`log` (or since this report was made: earlier counts are not repeated)."""

    def __init__(self):
        self._seen: "weakref.WeakKeyDictionary[ImageCounts, torch.Tensor]" = weakref.WeakKeyDictionary(
            {c: c.table.clone() for c in _all})

    def log(self, when: str) -> Optional[str]:
        """Log (a warning when images were skipped, else info) and return the line; None when nothing happened."""
        skipped, example, modes = 0, None, torch.zeros(len(MODES), dtype=torch.int64)
        for counts in list(_all):
            now = counts.table.clone()
            before = self._seen.get(counts, torch.zeros_like(now))
            self._seen[counts] = now
            delta = now - before
            skipped += int(delta[:, _SKIPPED].sum())
            rows = (delta[:, _SKIPPED] > 0).nonzero().flatten().tolist()
            if rows and example is None:
                example = counts.paths[int(now[rows[0], _EXAMPLE]) - 1]
            modes += delta[:, _FIRST_MODE:].sum(0)
        parts: List[str] = []
        if skipped:
            parts.append(f"skipped {skipped} unreadable image(s), e.g. {example} (data.on_corrupt=error stops at the first instead)")
        if int(modes.sum()):
            shown = ", ".join(f"{n} {mode}" + (f" ({MODE_NAMES[mode]})" if mode in MODE_NAMES else "")
                              for mode, n in zip(MODES, modes.tolist()) if n)
            parts.append(f"converted {int(modes.sum())} image(s) to RGB: {shown}")
        if not parts:
            return None
        line = f"{when}: " + "; ".join(parts)
        (log.warning if skipped else log.info)("%s", line)
        return line
