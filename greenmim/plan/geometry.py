"""Visible-token geometry that sparse convolutions read: coordinates and 3x3 neighbour indices.

:func:`neighbour_index` is host work (numpy, planned in the loader workers); :class:`VisibleGeometry`
holds a batch's indices on the device, built once per stage and reused by every block.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..ops.sparse_conv import OFFSETS_3X3
from .windows import visible_token_coords

def neighbour_index(mask: np.ndarray, grid: Tuple[int, int], t: int) -> np.ndarray:
    """``(B * N, 9)`` int64: for each visible token of a stage with ``t`` tokens per unit side
    (flattened over the batch, unit-major) the index of its 3x3 neighbours in nn.Conv2d kernel
    order; ``B * N`` (one past the end) where the neighbour is masked or outside the image.

    ``mask``: ``(B, num_units)`` numpy bool, True = masked; ``grid``: the unit grid ``(H, W)``."""
    batch = mask.shape[0]
    h, w = grid[0] * t, grid[1] * t
    ys, xs = visible_token_coords(mask, grid, t)
    n = ys.size
    b = np.repeat(np.arange(batch), n // max(batch, 1))
    # a one-token border of "missing" around each sample's map handles the image edges
    table = np.full((batch, h + 2, w + 2), n, dtype=np.int64)
    table[b, ys + 1, xs + 1] = np.arange(n)
    return np.stack([table[b, ys + 1 + dy, xs + 1 + dx] for dy, dx in OFFSETS_3X3], axis=1)


class VisibleGeometry:
    """Coordinates and neighbour indices of the visible tokens of every stage, cached per ``t``
    (tokens per unit side), so every block of a stage reuses them.

    Args:
        mask: ``(B, num_units)`` numpy bool, True = masked, equal visible count per sample.
        grid: the unit grid ``(height, width)``.
        device: where the index tensors live.
        neighbours: ``{t: neighbour index}`` already on ``device`` (planned ahead, see
            :mod:`greenmim.plan.planner`); missing ones are built here from the host mask.
    """

    def __init__(
        self,
        mask: np.ndarray,
        grid: Tuple[int, int],
        device: torch.device,
        neighbours: Optional[Dict[int, torch.Tensor]] = None,
    ):
        self.mask = mask
        self.grid = (int(grid[0]), int(grid[1]))
        self.device = torch.device(device)
        self.batch_size = mask.shape[0]
        self._cache: Dict[Tuple[str, int], torch.Tensor] = {("neighbours", t): v for t, v in (neighbours or {}).items()}

    def shape(self, t: int) -> Tuple[int, int]:
        """Stage grid ``(H, W)`` at ``t`` tokens per unit side."""
        return self.grid[0] * t, self.grid[1] * t

    def _cached(self, kind: str, t: int, build) -> torch.Tensor:
        key = (kind, t)
        if key not in self._cache:
            host = torch.from_numpy(np.ascontiguousarray(build()))
            if self.device.type == "cuda":  # pinned memory makes the copy asynchronous
                host = host.pin_memory()
            self._cache[key] = host.to(self.device, non_blocking=True)
        return self._cache[key]

    def _coords(self, t: int):
        ys, xs = visible_token_coords(self.mask, self.grid, t)
        batch = np.repeat(np.arange(self.batch_size), ys.size // max(self.batch_size, 1))
        return batch, ys, xs

    def sparse_indices(self, t: int) -> torch.Tensor:
        """``(B * N, 3)`` int32 ``(batch, y, x)`` of the visible tokens in unit-major order (spconv's layout)."""
        return self._cached("indices", t, lambda: np.stack(self._coords(t), axis=1).astype(np.int32))

    def token_keys(self, t: int) -> torch.Tensor:
        """``(B * N,)`` long: ``(batch * H + y) * W + x`` of the visible tokens in unit-major order."""
        h, w = self.shape(t)
        return self._cached("keys", t, lambda: self._keys(t, h, w))

    def _keys(self, t: int, h: int, w: int) -> np.ndarray:
        b, ys, xs = self._coords(t)
        return ((b * h + ys) * w + xs).astype(np.int64)

    def neighbours(self, t: int) -> torch.Tensor:
        """:func:`neighbour_index` of the stage with ``t`` tokens per unit side, on the device."""
        return self._cached("neighbours", t, lambda: neighbour_index(self.mask, self.grid, t))
