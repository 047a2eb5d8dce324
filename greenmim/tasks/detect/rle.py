"""Checking COCO run-length encoded (RLE) masks before pycocotools decodes them.

An RLE segmentation is ``{"size": [h, w], "counts": ...}``: run lengths over the column-major
flattened mask, alternating background/foreground and starting with background. ``counts`` is a
list of non-negative integers (uncompressed RLE) or a string (compressed RLE, COCO's own encoding:
each run is a little-endian sequence of 5-bit groups stored as ``chr(48 + group)``, bit 0x20 of a
character meaning "more groups follow" and bit 0x10 of the last one the sign, every run after the
second stored as the difference from the run two before it). A valid RLE's runs are non-negative
and sum to ``h * w``.

pycocotools checks none of this: garbage counts raise a bare ``ValueError``/``OverflowError`` in a
loader worker, an empty or truncated string decodes to uninitialised memory, and a ``size`` other
than the image's gives a mask that does not stack with the others. :func:`rle_problem` names
what is wrong instead.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional


def compressed_runs(counts: str) -> Optional[List[int]]:
    """The run lengths of a compressed RLE string, or None when it is not one (a character outside
    ``'0'..'o'`` or a run cut short at the end)."""
    runs: List[int] = []
    value = shift = 0
    for char in counts:
        group = ord(char) - 48
        if not 0 <= group < 64:
            return None
        value |= (group & 0x1F) << shift
        shift += 5
        if group & 0x20:  # more groups of this run follow
            continue
        if group & 0x10:  # the run's last group carries the sign
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value = shift = 0
    return None if shift else runs


def rle_problem(seg: Mapping[str, Any], height: int, width: int) -> Optional[str]:
    """Why the RLE ``seg`` cannot be the mask of an ``height`` x ``width`` image, or None when it can."""
    size = seg.get("size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2) or "counts" not in seg:
        return "RLE segmentation lacks size [h, w] or counts"
    if [size[0], size[1]] != [height, width]:
        return f"RLE size {list(size)} does not match the image's [height, width] [{height}, {width}]"
    counts = seg["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    if isinstance(counts, str):
        runs = compressed_runs(counts)
        if runs is None:
            return "RLE counts is not a valid compressed RLE string"
    elif isinstance(counts, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
            return "RLE counts holds values that are not integers"
        runs = counts
    else:
        return "RLE counts is neither a list of run lengths nor a compressed string"
    if any(v < 0 for v in runs):
        return "RLE counts has negative run lengths"
    if sum(runs) != height * width:
        return f"RLE counts cover {sum(runs)} pixels, not the image's {height}x{width} = {height * width}"
    return None
