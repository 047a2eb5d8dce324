"""Fit the grouping solver's cost model to measured group-attention times.

The solver minimises ``n_g * (a * g**2 + b * g)`` (:class:`~greenmim.plan.grouping.CostModel`). This
times :func:`~greenmim.ops.group_attention.group_window_attention` (forward + backward, the
projections excluded, as they run on visible tokens whatever the grouping) on groups of several
sizes ``g`` at two total slot counts (``slots`` and half of it: with one total, ``n_g * g`` would be
constant and ``b`` could not be told from ``c``), and fits ``time = a * n_g g^2 + b * n_g g + c`` by
non-negative least squares (``c`` absorbs fixed per-call overhead, which does not depend on the plan). Only the
ratio ``b / a`` matters to the solver, so the result is also given as ``CostModel(a=1, b=b/a)``.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Dict, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..plan.grouping import CostModel
from ..ops.group_attention import GroupLayout, group_window_attention
from ..plan.slots import plan_group_slots
from ..plan.windows import StageWindows
from ..engine.precision import Precision
from .step import synchronize

DEFAULT_GROUP_SIZES = (8, 16, 24, 32, 40, 49, 64, 80, 98)


def uniform_windows(num_windows: int, size: int) -> StageWindows:
    """``num_windows`` windows of exactly ``size`` tokens each: the solver puts one per group of ``size``."""
    ww = int(np.ceil(np.sqrt(size)))
    wh = int(np.ceil(size / ww))
    rank = np.tile(np.arange(size), num_windows)
    return StageWindows(
        ys=rank // ww,
        xs=rank % ww,
        token_window=np.repeat(np.arange(num_windows), size),
        token_rank=rank,
        counts=np.full(num_windows, size, dtype=np.int64),
        window=(wh, ww),
    )


def time_group_attention(
    group_size: int, num_groups: int, dim: int, heads: int, device: torch.device, dtype: str, fused: bool, reps: int, rel_bias: bool = True
) -> float:
    """Median seconds of one forward + backward of group attention on ``num_groups x group_size`` slots."""
    windows = uniform_windows(num_groups, group_size)
    layout = GroupLayout.from_slots(plan_group_slots(windows, CostModel()), device, relative_bias=rel_bias)
    if layout.group_size != group_size:  # pragma: no cover - guards against solver changes
        raise RuntimeError(f"calibration layout has group size {layout.group_size}, wanted {group_size}")
    wh, ww = windows.window
    table = torch.randn((2 * wh - 1) * (2 * ww - 1), heads, device=device, requires_grad=True) if rel_bias else None
    x = torch.randn(num_groups * group_size, 3 * dim, device=device, requires_grad=True)
    ident = nn.Identity()
    autocast = Precision(dtype, device).autocast()
    times = []
    for i in range(reps + 1):
        synchronize(device)
        t0 = time.perf_counter()
        with autocast:
            out = group_window_attention(x, layout, ident, ident, heads, table, fused=fused)
        out.float().sum().backward()
        synchronize(device)
        if i:  # the first run warms up
            times.append(time.perf_counter() - t0)
        x.grad = None
        if table is not None:
            table.grad = None
    return statistics.median(times)


def calibrate_cost_model(
    dim: int,
    heads: int,
    slots: int,
    device: torch.device,
    dtype: str = "fp32",
    fused: bool = True,
    group_sizes: Sequence[int] = DEFAULT_GROUP_SIZES,
    reps: int = 5,
    slot_fractions: Sequence[float] = (1.0, 0.5),
    rel_bias: bool = True,
) -> Dict[str, Any]:
    """Measure group attention at each group size on about ``slots * fraction`` slots for each of
    ``slot_fractions`` and fit the cost model. ``rel_bias``: with a relative position bias table
    (Swin) or without (Twins)."""
    slots = max(slots, 16 * max(group_sizes))  # enough groups at every size for a meaningful time
    rows = []
    for fraction in slot_fractions:
        for g in group_sizes:
            n_g = max(1, int(slots * fraction) // g)
            rows.append({"group_size": g, "num_groups": n_g, "seconds": time_group_attention(g, n_g, dim, heads, device, dtype, fused, reps, rel_bias)})
    g = np.array([r["group_size"] for r in rows], dtype=np.float64)
    n = np.array([r["num_groups"] for r in rows], dtype=np.float64)
    y = np.array([r["seconds"] for r in rows])
    features = np.stack([n * g * g, n * g, np.ones_like(g)], axis=1)
    coef = _nonneg_lstsq(features, y)
    fit = features @ coef
    for r, f in zip(rows, fit):
        r["fitted_seconds"] = float(f)
    a, b, c = (float(v) for v in coef)
    return {
        "dim": dim,
        "heads": heads,
        "slots": slots,
        "dtype": dtype,
        "fused": fused,
        "a_seconds": a,
        "b_seconds": b,
        "c_seconds": c,
        # a == 0: the quadratic term was not measurable (too few slots, or timer noise)
        "cost_model": {"a": 1.0, "b": b / a} if a > 0 else None,
        "max_relative_error": float(np.max(np.abs(fit - y) / y)),
        "points": rows,
    }


def _nonneg_lstsq(features: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients (active set over the few columns)."""
    active = list(range(features.shape[1]))
    while True:
        coef = np.zeros(features.shape[1])
        coef[active] = np.linalg.lstsq(features[:, active], y, rcond=None)[0]
        negative = [i for i in active if coef[i] < 0]
        if not negative:
            return coef
        active.remove(min(negative, key=lambda i: coef[i]))


def first_window_attention(encoder: nn.Module) -> nn.Module:
    """The first windowed attention module of a Swin (``WindowAttention``) or Twins
    (``LocallyGroupedAttn``) encoder: its width and heads size the calibration."""
    from timm.models.swin_transformer import WindowAttention
    from timm.models.swin_transformer_v2 import WindowAttention as WindowAttentionV2
    from timm.models.twins import LocallyGroupedAttn

    for module in encoder.modules():
        if isinstance(module, (WindowAttention, WindowAttentionV2, LocallyGroupedAttn)):
            return module
    raise ValueError(f"{type(encoder).__name__} has no window attention to calibrate (Swin or Twins)")
