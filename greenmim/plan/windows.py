"""Where the visible tokens of a stage sit, and which attention window each belongs to.

Visible tokens of a stage are stored *unit-major*: for every sample, its visible units in ascending
raster order, and inside each unit its ``t x t`` tokens in raster order (``t`` = tokens per unit
side: 8, 4, 2, 1 for Swin's four stages). With this order a 2x2 patch merge is a reshape, and the
last stage (``t = 1``) is simply the visible units in ascending raster order.

Window partition. Regular blocks tile the stage grid from the origin with ``window`` sized windows.
Shifted blocks use windows whose origin is moved by ``-shift``: partial windows at the borders.
This is what Swin's cyclic shift plus attention mask computes, written in true coordinates, so the
relative position of two tokens is their true coordinate difference.

Everything here is host-side numpy on the (small) mask: it runs once per stage and partition and
its result is reused by every block of that stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from .masking import visible_indices


@dataclass
class StageWindows:
    """Visible tokens of one stage (flattened over the batch, unit-major order) and their windows.

    Attributes:
        ys, xs: ``(N,)`` token coordinates on the stage grid.
        token_window: ``(N,)`` index of each token's window among the non-empty windows.
        token_rank: ``(N,)`` position of the token inside its window (in unit-major order).
        counts: ``(num_windows,)`` visible tokens of each non-empty window.
        window: window size ``(h, w)``; capacity is ``h * w``.
    """

    ys: np.ndarray
    xs: np.ndarray
    token_window: np.ndarray
    token_rank: np.ndarray
    counts: np.ndarray
    window: Tuple[int, int]

    @property
    def capacity(self) -> int:
        return self.window[0] * self.window[1]


def visible_token_coords(mask: np.ndarray, grid: Tuple[int, int], tokens_per_unit: int) -> Tuple[np.ndarray, np.ndarray]:
    """Stage-grid coordinates ``(ys, xs)``, each ``(B * N_vis * t * t,)``, of the visible tokens in
    unit-major order. ``mask``: ``(B, num_units)`` bool, True = masked."""
    t = tokens_per_unit
    batch = mask.shape[0]
    vis = np.nonzero(~mask)  # row-major: per sample, ascending unit index
    units = vis[1].reshape(batch, -1)
    uy, ux = np.divmod(units, grid[1])
    ty, tx = np.divmod(np.arange(t * t), t)
    ys = (uy[:, :, None] * t + ty).reshape(-1)
    xs = (ux[:, :, None] * t + tx).reshape(-1)
    return ys, xs


def stage_windows(
    mask: np.ndarray,
    grid: Tuple[int, int],
    tokens_per_unit: int,
    window,
    shift=0,
) -> StageWindows:
    """Window membership of every visible token of a stage.

    Args:
        mask: ``(B, num_units)`` bool, True = masked.
        grid: the unit grid ``(height, width)``.
        tokens_per_unit: tokens per unit side at this stage.
        window: window size (int or ``(h, w)``).
        shift: shift of the partition (int or ``(h, w)``); 0 for regular blocks.
    """
    wh, ww = (window, window) if np.isscalar(window) else tuple(window)
    sh, sw = (shift, shift) if np.isscalar(shift) else tuple(shift)
    batch = mask.shape[0]
    height, width = grid[0] * tokens_per_unit, grid[1] * tokens_per_unit
    for size, win, name in ((height, wh, "height"), (width, ww, "width")):
        if size % win and win < size:
            raise ValueError(
                f"stage grid {name} {size} is not a multiple of the window size {win}; choose a window size "
                f"that divides every stage's grid (e.g. window_size=7 at 224 px, 6 at 192 px, 12 at 384 px)"
            )
    ys, xs = visible_token_coords(mask, grid, tokens_per_unit)
    # window index along each axis: windows start at -shift, so a shifted partition has one more
    wy = (ys - sh) // wh + (1 if sh else 0)
    wx = (xs - sw) // ww + (1 if sw else 0)
    nwy = (height - 1 - sh) // wh + 1 + (1 if sh else 0)
    nwx = (width - 1 - sw) // ww + 1 + (1 if sw else 0)
    per_sample = ys.size // max(batch, 1)
    sample = np.repeat(np.arange(batch), per_sample)
    global_window = (sample * nwy + wy) * nwx + wx

    counts_all = np.bincount(global_window, minlength=batch * nwy * nwx)
    nonempty = counts_all > 0
    compact = np.cumsum(nonempty) - 1
    token_window = compact[global_window]
    counts = counts_all[nonempty]

    # rank inside the window: tokens of the same window that come earlier in unit-major order
    order = np.argsort(token_window, kind="stable")
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    token_rank = np.empty_like(token_window)
    token_rank[order] = np.arange(token_window.size) - starts[token_window[order]]
    return StageWindows(ys, xs, token_window, token_rank, counts, (wh, ww))


def tokens_to_grid(tokens, mask, grid: Tuple[int, int], tokens_per_unit: int):
    """Scatter unit-major visible tokens ``(B, N_vis * t * t, C)`` to a dense ``(B, C, H, W)`` map,
    zeros at masked units (``H = grid[0] * t``). ``mask``: ``(B, num_units)`` bool torch tensor."""
    t = tokens_per_unit
    b, n, c = tokens.shape
    n_vis = n // (t * t)
    num_units = grid[0] * grid[1]
    vis_idx = visible_indices(mask).to(tokens.device)
    dense = tokens.new_zeros(b, num_units, t * t * c)
    dense.scatter_(1, vis_idx.unsqueeze(-1).expand(-1, -1, t * t * c), tokens.reshape(b, n_vis, t * t * c))
    dense = dense.view(b, grid[0], grid[1], t, t, c).permute(0, 5, 1, 3, 2, 4)
    return dense.reshape(b, c, grid[0] * t, grid[1] * t)
