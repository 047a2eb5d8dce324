"""The grouping solver: pack windows of visible tokens into equal-size groups at minimal attention cost.

Problem. Window ``i`` holds ``counts[i]`` visible tokens (``1 <= counts[i] <= capacity``, the window
area). Choose a group size ``g >= max(counts)`` and a partition of the windows into groups whose
counts sum to at most ``g``. Attention then runs on ``(num_groups, heads, g, g)`` tensors, so the
plan minimises the cost model

    attention_cost(g, n) = n * (a * g**2 + b * g)

(``a``: score and value work per slot pair; ``b``: per-slot work and memory traffic: gathers,
projections of padding, softmax rows).

Method. For a fixed ``g`` the cost is ``f(g) * n``, so the best plan for that ``g`` uses the fewest
groups: a bin-packing problem whose items are small integers. The solver works on the histogram of
counts, never on individual windows:

1. lower bounds on the number of groups (the volume bound and Martello-Toth's L2 bound);
2. best-fit decreasing, run on the histogram in batches (one step per size and residual, not per
   window), which usually meets the bound;
3. where it does not and the instance is small (at most ``exact_max_windows`` windows), an exact
   branch-and-bound over histogram states (largest item first, only maximal fillings, memoised)
   closes the gap within a node budget. Larger instances keep the best-fit plan together with its
   proven lower bound: ``plan.optimal`` says whether optimality is proven and
   ``plan.cost / plan.lower_bound`` bounds the gap (measured by ``greenmim-bench --solver-only``:
   a few tenths of a percent at Swin-B stage 1, batch 128).

``g`` is searched upward from ``max(counts)`` until the volume bound ``sum(counts) * (a*g + b)``
exceeds the best plan found, so the returned plan is optimal over every group size, not only the
smallest one. Windows of different samples may share a group: the window id keeps them apart in
the attention mask.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

Pattern = Tuple[int, ...]  # the counts packed into one group, in decreasing order


@dataclass(frozen=True)
class CostModel:
    """``cost(g, n) = n * (a * g^2 + b * g)``; defaults calibrated by ``greenmim-bench --calibrate``."""

    a: float = 1.0
    b: float = 48.0

    def group_cost(self, group_size: int) -> float:
        return self.a * group_size * group_size + self.b * group_size


DEFAULT_COST_MODEL = CostModel()


def attention_cost(group_size: int, num_groups: int, cost_model: CostModel = DEFAULT_COST_MODEL) -> float:
    """Cost of running grouped attention on ``num_groups`` groups of ``group_size`` slots."""
    return num_groups * cost_model.group_cost(group_size)


@dataclass
class GroupingPlan:
    """A packing of windows into groups.

    Attributes:
        group_size: slots per group ``g``.
        num_groups: number of groups ``n``.
        window_group: ``(num_windows,)`` int64, the group of each window.
        window_offset: ``(num_windows,)`` int64, the first slot of each window inside its group.
        cost: ``attention_cost(group_size, num_groups)``.
        lower_bound: a proven lower bound on the cost of any plan; ``cost == lower_bound`` proves
            the plan optimal.
    """

    group_size: int
    num_groups: int
    window_group: np.ndarray
    window_offset: np.ndarray
    cost: float
    lower_bound: float
    counts: np.ndarray = field(repr=False)

    @property
    def optimal(self) -> bool:
        return self.cost <= self.lower_bound * (1 + 1e-12)

    @property
    def groups(self) -> List[List[int]]:
        """The windows (indices into ``counts``) of each group, in slot order."""
        out: List[List[int]] = [[] for _ in range(self.num_groups)]
        order = np.lexsort((self.window_offset, self.window_group))
        for w in order.tolist():
            out[int(self.window_group[w])].append(w)
        return out

    @property
    def efficiency(self) -> float:
        """Visible slots / allocated slots."""
        slots = self.num_groups * self.group_size
        return float(self.counts.sum()) / slots if slots else 1.0


def solve_grouping(
    counts: Sequence[int],
    capacity: int,
    cost_model: CostModel = DEFAULT_COST_MODEL,
    node_limit: int = 300,
    exact_max_windows: int = 64,
    group_multiple: int = 1,
    group_size: Optional[int] = None,
) -> GroupingPlan:
    """Find the group size and packing of windows that minimise ``attention_cost``.

    Args:
        counts: visible tokens of each non-empty window (all windows of the batch), each in
            ``[1, capacity]``.
        capacity: the window area ``w*w`` (the largest possible count).
        cost_model: the cost model to minimise.
        node_limit: budget of the exact search per group size.
        exact_max_windows: run the exact search (when best-fit decreasing does not meet the lower
            bound) only on instances with at most this many windows.
        group_multiple: consider only group sizes that are multiples of this (fused GPU attention
            kernels want the key length aligned to 8); optimality is over those sizes.
        group_size: pack into groups of exactly this size (static plans: see
            :mod:`greenmim.plan.static_shapes`) instead of searching ``g``; it must hold the largest
            count. Optimality (``plan.optimal``, ``plan.lower_bound``) is then over this size only.
    """
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    if counts.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return GroupingPlan(0, 0, empty, empty, 0.0, 0.0, counts)
    if group_multiple < 1:
        raise ValueError(f"group_multiple must be >= 1, got {group_multiple}")
    if counts.min() < 1 or counts.max() > capacity:
        raise ValueError(f"window counts must lie in [1, capacity={capacity}], got [{counts.min()}, {counts.max()}]")
    if group_size is not None and group_size < counts.max():
        raise ValueError(f"group_size {group_size} cannot hold a window of {counts.max()} tokens")
    hist = np.bincount(counts, minlength=capacity + 1)
    total = int(counts.sum())
    max_count = int(counts.max())

    best: Optional[Tuple[float, int, Dict[Pattern, int]]] = None  # (cost, g, patterns)
    proven_floor = float("inf")  # min over searched g of f(g) * (proven minimal groups for g)
    g = group_size if group_size is not None else -(-max_count // group_multiple) * group_multiple
    while True:
        volume_floor = total * (cost_model.a * g + cost_model.b)  # n >= total/g for this and every larger g
        if best is not None and volume_floor >= best[0]:
            proven_floor = min(proven_floor, volume_floor)
            break
        f_g = cost_model.group_cost(g)
        lb = _min_groups_lower_bound(hist, g, total)
        if best is None or f_g * lb < best[0]:
            patterns = _best_fit_decreasing(hist, g)
            n = sum(patterns.values())
            if n > lb and counts.size <= exact_max_windows:
                exact = _exact_min_groups(hist, g, lb, n, patterns, node_limit)
                patterns, n, lb = exact
            if best is None or f_g * n < best[0]:
                best = (f_g * n, g, patterns)
        proven_floor = min(proven_floor, f_g * lb)
        if group_size is not None or g >= total:  # fixed size, or one group holds everything
            break
        g += group_multiple

    cost, g, patterns = best
    window_group, window_offset = _assign_windows(counts, patterns)
    return GroupingPlan(
        group_size=g,
        num_groups=int(sum(patterns.values())),
        window_group=window_group,
        window_offset=window_offset,
        cost=float(cost),
        lower_bound=float(min(proven_floor, cost)),
        counts=counts,
    )


def best_fit_groups(counts: np.ndarray, group_size: int) -> int:
    """Groups of ``group_size`` that best-fit decreasing packs ``counts`` into: an upper bound on the
    groups :func:`solve_grouping` needs at that size (which never does worse than best-fit)."""
    return int(sum(_best_fit_decreasing(np.bincount(counts), group_size).values()))


def _min_groups_lower_bound(hist: np.ndarray, g: int, total: int) -> int:
    """max(volume bound, Martello-Toth L2) on the number of groups of size ``g``."""
    sizes = np.arange(hist.size)
    lb = -(-total // g)
    # L2(k): items > g-k need their own group; items in (g/2, g-k] too; items in [k, g/2] fill the
    # room those leave, the rest needs new groups.
    for k in range(0, g // 2 + 1):
        big = sizes > g - k
        mid = (sizes > g / 2) & (sizes <= g - k)
        small = (sizes >= max(k, 1)) & (sizes <= g / 2)
        n_big = int(hist[big].sum())
        n_mid = int(hist[mid].sum())
        room = n_mid * g - int((hist[mid] * sizes[mid]).sum())
        need = int((hist[small] * sizes[small]).sum()) - room
        lb = max(lb, n_big + n_mid + max(0, -(-need // g)))
    return lb


def _best_fit_decreasing(hist: np.ndarray, g: int) -> Dict[Pattern, int]:
    """Best-fit decreasing on the histogram: each item goes into the fullest group it fits.

    Returns ``{pattern: number of groups}``. Batched: groups with equal residual room and the items
    of one size move together, so the work is O(sizes * g), not O(windows).
    """
    by_residual: Dict[int, Counter] = {}  # residual room -> Counter(pattern -> groups)
    for size in range(hist.size - 1, 0, -1):
        left = int(hist[size])
        while left > 0:
            room = next((r for r in range(size, g + 1) if by_residual.get(r)), None)
            if room is None:  # open fresh groups, each taking as many items of this size as fit
                per_group = g // size
                full, rest = divmod(left, per_group)
                if full:
                    _add(by_residual, g - per_group * size, (size,) * per_group, full)
                if rest:
                    _add(by_residual, g - rest * size, (size,) * rest, 1)
                break
            per_group = room // size
            bucket = by_residual[room]
            for pattern, n in list(bucket.items()):
                if left == 0:
                    break
                take = min(n, left // per_group)
                if take:
                    _move(by_residual, room, pattern, take, (size,) * per_group, room - per_group * size)
                    left -= take * per_group
                if left and left < per_group and bucket.get(pattern):
                    _move(by_residual, room, pattern, 1, (size,) * left, room - left * size)
                    left = 0
    patterns: Counter = Counter()
    for bucket in by_residual.values():
        patterns.update(bucket)
    return dict(patterns)


def _add(by_residual: Dict[int, Counter], room: int, pattern: Pattern, n: int) -> None:
    by_residual.setdefault(room, Counter())[pattern] += n


def _move(by_residual: Dict[int, Counter], room: int, pattern: Pattern, n: int, extra: Pattern, new_room: int) -> None:
    bucket = by_residual[room]
    bucket[pattern] -= n
    if bucket[pattern] == 0:
        del bucket[pattern]
    _add(by_residual, new_room, tuple(sorted(pattern + extra, reverse=True)), n)


def _exact_min_groups(
    hist: np.ndarray, g: int, lower: int, upper: int, incumbent: Dict[Pattern, int], node_limit: int
) -> Tuple[Dict[Pattern, int], int, int]:
    """Branch and bound over histogram states for the fewest groups of size ``g``.

    Returns ``(patterns, groups, proven_lower_bound)``; the bound equals ``groups`` unless the node
    budget ran out first.
    """
    state0 = tuple(int(c) for c in hist)
    best_n = upper
    best_groups: List[Pattern] = []
    failed: Dict[Tuple[int, ...], int] = {}  # state -> fewest groups already known not to beat best
    nodes = 0
    exhausted = False

    def bound(state: Tuple[int, ...]) -> int:
        vol = sum(s * c for s, c in enumerate(state))
        big = sum(c for s, c in enumerate(state) if 2 * s > g)
        return max(-(-vol // g), big)

    def search(state: Tuple[int, ...], used: int, chosen: List[Pattern]) -> None:
        nonlocal best_n, best_groups, nodes, exhausted
        if exhausted:
            return
        nodes += 1
        if nodes > node_limit:
            exhausted = True
            return
        largest = max((s for s, c in enumerate(state) if c), default=0)
        if largest == 0:
            if used < best_n:
                best_n, best_groups = used, list(chosen)
            return
        if used + bound(state) >= best_n or failed.get(state, 1 << 60) <= used:
            return
        failed[state] = used
        rest = list(state)
        rest[largest] -= 1
        for filling in _maximal_fillings(rest, largest, g - largest):
            nxt = list(rest)
            for s in filling:
                nxt[s] -= 1
            chosen.append((largest,) + filling)
            search(tuple(nxt), used + 1, chosen)
            chosen.pop()
            if best_n == lower:
                return

    search(state0, 0, [])
    if best_groups:
        patterns = dict(Counter(best_groups))
    else:
        patterns = incumbent
    proven = best_n if not exhausted else lower
    return patterns, best_n, proven


def _maximal_fillings(state: List[int], max_size: int, room: int) -> Iterator[Pattern]:
    """Multisets of available sizes (each <= max_size) that fit ``room`` and leave no available item
    that would still fit; fullest first."""
    sizes = [s for s in range(min(max_size, room), 0, -1) if state[s]]
    smallest_available = min((s for s in range(1, max_size + 1) if state[s]), default=None)
    results: List[Tuple[int, Pattern]] = []

    def rec(i: int, room_left: int, picked: List[int], used: Dict[int, int]) -> None:
        if i == len(sizes):
            # maximal: no available item (counting what we picked) fits the room left
            for s in range(1, min(max_size, room_left) + 1):
                if state[s] - used.get(s, 0) > 0:
                    return
            results.append((room - room_left, tuple(picked)))
            return
        s = sizes[i]
        most = min(state[s], room_left // s)
        for k in range(most, -1, -1):
            if k:
                used[s] = k
            rec(i + 1, room_left - k * s, picked + [s] * k, used)
            used.pop(s, None)

    if smallest_available is None or smallest_available > room:
        yield ()
        return
    rec(0, room, [], {})
    for _, filling in sorted(results, key=lambda t: -t[0]):
        yield filling


def _assign_windows(counts: np.ndarray, patterns: Dict[Pattern, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Turn ``{pattern: groups}`` into each window's group and slot offset (vectorised per pattern)."""
    order = np.argsort(-counts, kind="stable")
    sorted_counts = counts[order]
    # windows of each size, as a slice of `order`
    sizes, starts = np.unique(-sorted_counts, return_index=True)
    next_of_size = {int(-s): int(st) for s, st in zip(sizes, starts)}
    window_group = np.empty(counts.size, dtype=np.int64)
    window_offset = np.empty(counts.size, dtype=np.int64)
    group0 = 0
    for pattern, n in sorted(patterns.items(), key=lambda kv: kv[0], reverse=True):
        groups = np.arange(group0, group0 + n, dtype=np.int64)
        offset = 0
        for size in pattern:
            st = next_of_size[size]
            idx = order[st:st + n]
            next_of_size[size] = st + n
            window_group[idx] = groups
            window_offset[idx] = offset
            offset += size
        group0 += n
    return window_group, window_offset
