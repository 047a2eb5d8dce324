"""The grouping solver: valid plans, optimal against brute force, sensible on real mask statistics."""
import math

import numpy as np
import pytest
import torch

from greenmim.plan.grouping import CostModel, attention_cost, solve_grouping
from greenmim.plan.masking import random_mask
from greenmim.plan.windows import stage_windows


def set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]
        yield [[first]] + part


def brute_force_cost(counts, cost_model):
    best = math.inf
    for part in set_partitions(list(range(len(counts)))):
        g = max(sum(counts[i] for i in grp) for grp in part)
        best = min(best, attention_cost(g, len(part), cost_model))
    return best


def check_valid(plan, counts):
    groups = plan.groups
    flat = sorted(i for grp in groups for i in grp)
    assert flat == list(range(len(counts))), "every window exactly once"
    assert len(groups) == plan.num_groups
    assert plan.group_size >= max(counts)
    for grp in groups:
        assert grp, "no empty group"
        assert sum(counts[i] for i in grp) <= plan.group_size
    # slot offsets tile each group without overlap
    for grp in groups:
        spans = sorted((int(plan.window_offset[i]), int(plan.window_offset[i]) + counts[i]) for i in grp)
        for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
            assert a1 <= b0
        assert spans[-1][1] <= plan.group_size


@pytest.mark.parametrize("seed", range(60))
def test_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.choice([4, 9, 16]))
    n = int(rng.integers(1, 8))
    counts = rng.integers(1, capacity + 1, size=n).tolist()
    cost_model = CostModel(a=float(rng.choice([1.0, 0.5])), b=float(rng.choice([0.0, 4.0, 48.0])))
    plan = solve_grouping(counts, capacity, cost_model)
    check_valid(plan, counts)
    assert plan.cost == pytest.approx(attention_cost(plan.group_size, plan.num_groups, cost_model))
    assert plan.cost == pytest.approx(brute_force_cost(counts, cost_model))
    assert plan.optimal


def test_searches_group_size_beyond_max_count():
    # one window of 9 and many of 5: g=10 pairs the 5s; g=9 wastes 4 slots per group
    counts = [9] + [5] * 8
    cm = CostModel(a=1.0, b=0.0)
    plan = solve_grouping(counts, 9, cm)
    assert plan.cost == pytest.approx(brute_force_cost(counts, cm))
    assert plan.group_size == 10 and plan.num_groups == 5


def test_exact_search_beats_best_fit_decreasing():
    # classic instance where BFD uses 3 groups of 10 and the optimum uses 2: {6,4} {3,3,2,2}
    counts = [6, 3, 3, 2, 2, 4]
    cm = CostModel(a=1.0, b=1000.0)  # make g=max count attractive
    plan = solve_grouping(counts, 10, cm)
    check_valid(plan, counts)
    assert plan.cost == pytest.approx(brute_force_cost(counts, cm))


def test_rejects_bad_counts():
    with pytest.raises(ValueError, match="capacity"):
        solve_grouping([0, 3], 9)
    with pytest.raises(ValueError, match="capacity"):
        solve_grouping([10], 9)


@pytest.mark.parametrize("shift", [0, 3])
def test_real_masks_are_packed_tightly_with_a_proven_bound(shift):
    """Swin stage 1 at 224 px, batch 16, mask 0.75: dense packing within 1% of the proven bound."""
    mask = random_mask(16, 49, 0.75, generator=torch.Generator().manual_seed(0))
    win = stage_windows(mask.numpy(), (7, 7), tokens_per_unit=8, window=7, shift=shift)
    plan = solve_grouping(win.counts, 49)
    check_valid(plan, win.counts.tolist())
    assert plan.lower_bound <= plan.cost <= 1.01 * plan.lower_bound
    assert plan.efficiency > 0.95


def test_lower_bound_is_a_true_bound():
    """On random small instances the certified bound never exceeds the brute-force optimum."""
    rng = np.random.default_rng(7)
    for _ in range(30):
        counts = rng.integers(1, 10, size=int(rng.integers(2, 8))).tolist()
        plan = solve_grouping(counts, 9, exact_max_windows=0)  # no exact search: bound from bounds alone
        assert plan.lower_bound <= brute_force_cost(counts, CostModel()) + 1e-9 <= plan.cost + 1e-9
