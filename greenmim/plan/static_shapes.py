"""Static plan shapes: one group size ``g`` and group count ``n_g`` per window layout.

The free solver (:func:`~greenmim.plan.grouping.solve_grouping`) picks ``g`` and ``n_g`` per batch, so the
attention's shapes change from step to step and defeat ``torch.compile`` and CUDA graphs. For one
batch size and mask ratio the number of visible tokens of every stage is fixed, and so is the
geometry; only the split of those tokens over the windows varies. A static plan therefore fixes,
per layout (stage and window partition), the :class:`StaticShape` that is cheapest for the masks
this geometry produces:

* :func:`max_window_count` bounds the visible tokens a window can ever hold (the window's largest
  overlaps with ``num_visible`` units);
* :func:`fit_static_shapes` draws :data:`CALIBRATION_BATCHES` random batches (a fixed seed per batch
  size and visible count, so every DataLoader worker finds the same shapes), and for every
  candidate ``g`` (multiples of ``group_multiple`` between the largest count seen plus a margin and
  the bound) the fewest groups each batch needs at that ``g``; it keeps the ``g`` whose worst batch
  plus a margin costs least.

:func:`static_packing` packs one batch into its layout's shape. A batch that does not fit (a window
larger than ``g``, or more groups needed than ``n_g``: rare, see ``greenmim-bench`` and
docs/design.md) is still planned exactly: ``g`` grows to hold its largest window and ``n_g`` grows
in steps of :func:`overflow_step` groups, so overflowing batches fall into a few larger shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Hashable, List, Sequence, Tuple

import numpy as np

from .grouping import CostModel, GroupingPlan, best_fit_groups, solve_grouping
from .windows import stage_windows

CALIBRATION_BATCHES = 64  # random batches that size each layout's shape
GROUP_MARGIN = 0.02  # extra groups over the worst calibration batch (fraction, at least one group)


@dataclass(frozen=True)
class StaticShape:
    """The ``(num_groups, group_size)`` slot grid of one layout in a static plan."""

    group_size: int
    num_groups: int


def round_up(value: int, multiple: int) -> int:
    return -(-int(value) // multiple) * multiple


def overflow_step(static: StaticShape) -> int:
    """Groups are added in steps of this many when a batch overflows its static shape."""
    return max(1, -(-static.num_groups // 16))


def max_window_count(grid: Tuple[int, int], tokens_per_unit: int, window, shift, num_visible: int) -> int:
    """The most visible tokens any window of this partition can hold when ``num_visible`` units of
    the ``grid`` are visible: for each window, the sum of its ``num_visible`` largest overlaps with
    a unit, maximised over the windows."""
    num_units = grid[0] * grid[1]
    t = tokens_per_unit
    everything = stage_windows(np.zeros((1, num_units), dtype=bool), grid, t, window, shift)
    unit_of_token = np.repeat(np.arange(num_units), t * t)  # unit-major token order
    overlap = np.zeros((everything.counts.size, num_units), dtype=np.int64)
    np.add.at(overlap, (everything.token_window, unit_of_token), 1)
    best = -np.sort(-overlap, axis=1)[:, :num_visible].sum(axis=1)
    return int(best.max())


def calibration_masks(batch: int, num_units: int, num_visible: int) -> List[np.ndarray]:
    """:data:`CALIBRATION_BATCHES` uniform random masks ``(batch, num_units)`` (True = masked), from a
    seed fixed by the shape, so every process sizes the same shapes."""
    rng = np.random.default_rng([batch, num_units, num_visible, 0x5354])
    ranks = rng.random((CALIBRATION_BATCHES, batch, num_units)).argsort(axis=2).argsort(axis=2)
    return list(ranks >= num_visible)


def fit_static_shape(
    samples: Sequence[np.ndarray], bound: int, cost_model: CostModel, group_multiple: int
) -> StaticShape:
    """The cheapest ``(g, n_g)`` that packs every calibration batch with a margin.

    Args:
        samples: each calibration batch's window counts.
        bound: the most tokens a window can hold (:func:`max_window_count`).
        cost_model: the attention cost to minimise.
        group_multiple: group sizes are multiples of this.
    """
    largest = max(int(c.max()) for c in samples)
    g_max = round_up(bound, group_multiple)
    # one step of headroom over the largest window seen (capped by the bound): a batch with a larger
    # window would overflow
    g_min = min(round_up(largest + max(1, group_multiple // 2), group_multiple), g_max)
    total = max(int(c.sum()) for c in samples)  # visible tokens of a batch (the same in every batch)
    best = None
    for g in range(g_min, g_max + 1, group_multiple):
        if best is not None and total * (cost_model.a * g + cost_model.b) >= best[0]:
            break  # n_g >= total / g: this and every larger g cost more than the best
        need = max(best_fit_groups(c, g) for c in samples)
        n_g = need + max(1, int(np.ceil(GROUP_MARGIN * need)))
        cost = n_g * cost_model.group_cost(g)
        if best is None or cost < best[0]:
            best = (cost, StaticShape(g, n_g))
    return best[1]


def static_packing(
    counts: np.ndarray, capacity: int, static: StaticShape, cost_model: CostModel, group_multiple: int
) -> Tuple[GroupingPlan, StaticShape, bool]:
    """Pack one batch's window ``counts`` into ``static``.

    Returns ``(plan, shape, overflow)``: the packing at ``shape.group_size``; ``shape`` is ``static``
    unless the batch overflows it (``overflow`` True), in which case ``g`` holds the largest window
    and ``n_g`` is the groups needed rounded up to :func:`overflow_step` above the static count.
    """
    g = max(static.group_size, round_up(int(counts.max()), group_multiple))
    plan = solve_grouping(counts, capacity, cost_model, group_size=g)
    n_g = static.num_groups
    if plan.num_groups > n_g:
        n_g += round_up(plan.num_groups - n_g, overflow_step(static))
    shape = StaticShape(g, n_g)
    return plan, shape, shape != static


def fit_static_shapes(
    partitions: Sequence, grid: Tuple[int, int], tokens_per_unit: Sequence[int], batch: int, num_visible: int,
    cost_model: CostModel, group_multiple: int,
) -> Dict[Tuple[int, Hashable], StaticShape]:
    """``{(stage, partition key): StaticShape}`` for batches of ``batch`` masks with ``num_visible``
    visible units each (``partitions``: the planner's :class:`~greenmim.plan.planner.WindowPartition`)."""
    masks = calibration_masks(batch, grid[0] * grid[1], num_visible)
    shapes: Dict[Tuple[int, Hashable], StaticShape] = {}
    for part in partitions:
        key = (part.stage, part.key)
        if key in shapes:
            continue
        t = tokens_per_unit[part.stage]
        samples = [stage_windows(m, grid, t, part.window, part.shift) for m in masks]
        bound = max_window_count(grid, t, part.window, part.shift, num_visible)
        shapes[key] = fit_static_shape([s.counts for s in samples], bound, cost_model, group_multiple)
    return shapes
