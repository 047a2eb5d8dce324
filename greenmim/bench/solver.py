"""Host cost of planning: solver time and packing efficiency on random masks, no training.

For every stage and window partition of a visible-only encoder (its planner's partitions) this
times :func:`~greenmim.plan.windows.stage_windows` (window membership) and
:func:`~greenmim.plan.grouping.solve_grouping` (the packing) on fresh random masks, and also the
planner's whole :meth:`~greenmim.plan.planner.VisiblePlanner.plan` (what a DataLoader worker pays per
batch, slot vectors and neighbour indices included).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List

import torch

from ..plan.grouping import solve_grouping
from ..plan.masking import random_mask
from ..plan.windows import stage_windows


def _stats(values: List[float]) -> Dict[str, float]:
    v = sorted(values)
    return {"median": statistics.median(v), "p90": v[min(len(v) - 1, int(round(0.9 * (len(v) - 1))))], "max": v[-1]}


def solver_benchmark(encoder: torch.nn.Module, batch_size: int, mask_ratio: float, num_masks: int, seed: int = 0) -> Dict[str, Any]:
    """Solver time and packing efficiency of every partition of ``encoder`` over ``num_masks`` masks
    of ``batch_size`` samples (per-sample masks, as in training)."""
    planner = encoder.planner()
    grid = planner.grid
    partitions = list({(p.stage, p.key): p for p in planner.partitions}.values())
    if not partitions:
        raise ValueError(f"{type(encoder).__name__} has no window-attention block: nothing to group")
    gen = torch.Generator().manual_seed(seed)
    per_part = {p: {"windows_ms": [], "solve_ms": [], "eff": [], "g": [], "n_g": [], "nw": [], "optimal": []} for p in partitions}
    plan_ms: List[float] = []
    plan_eff: List[float] = []
    for _ in range(num_masks):
        mask = random_mask(batch_size, grid.num_units, mask_ratio, generator=gen)
        mask_np = mask.numpy()
        for p in partitions:
            t = planner.tokens_per_unit[p.stage]
            t0 = time.perf_counter()
            win = stage_windows(mask_np, (grid.height, grid.width), t, p.window, p.shift)
            t1 = time.perf_counter()
            plan = solve_grouping(win.counts, win.capacity, encoder.cost_model)
            t2 = time.perf_counter()
            rec = per_part[p]
            rec["windows_ms"].append((t1 - t0) * 1e3)
            rec["solve_ms"].append((t2 - t1) * 1e3)
            rec["eff"].append(plan.efficiency)
            rec["g"].append(plan.group_size)
            rec["n_g"].append(plan.num_groups)
            rec["nw"].append(int(win.counts.size))
            rec["optimal"].append(bool(plan.optimal))
        stats = planner.plan(mask).stats()
        plan_ms.append(stats["ms"])
        plan_eff.append(stats["efficiency"])
    rows = []
    for p, rec in per_part.items():
        rows.append({
            "stage": p.stage + 1,
            "window": list(p.window),
            "shift": list(p.shift),
            "windows": statistics.median(rec["nw"]),
            "capacity": p.window[0] * p.window[1],
            "group_size": statistics.median(rec["g"]),
            "num_groups": statistics.median(rec["n_g"]),
            "efficiency": statistics.fmean(rec["eff"]),
            "solve_ms": _stats(rec["solve_ms"]),
            "stage_windows_ms": _stats(rec["windows_ms"]),
            "optimal_fraction": statistics.fmean(rec["optimal"]),
        })
    total_solve = [sum(per_part[p]["solve_ms"][k] for p in partitions) for k in range(num_masks)]
    out: Dict[str, Any] = {
        "img_size": list(grid.img_size),
        "batch_size": batch_size,
        "mask_ratio": mask_ratio,
        "masks": num_masks,
        "partitions": rows,
        "solve_ms_per_step": _stats(total_solve),
    }
    out["plan_ms"] = _stats(plan_ms)
    out["plan_efficiency"] = statistics.fmean(plan_eff)
    return out
