"""Host cost of the grouping: solver time and packing efficiency on random masks, no training.

For every stage and window partition of a visible-only Swin encoder this times
:func:`~greenmim.ops.windows.stage_windows` (window membership) and
:func:`~greenmim.grouping.solve_grouping` (the packing) on fresh random masks, and also the
encoder's whole ``build_layouts`` (what a training step pays on the host, device tensors included).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Dict, Iterator, List, Tuple

import torch

from ..grouping import solve_grouping
from ..masking import random_mask, unit_grid
from ..ops.windows import stage_windows

Partition = Tuple[int, int, Tuple[int, int], Tuple[int, int]]  # stage, tokens per unit, window, shift


def window_attention_blocks(encoder: torch.nn.Module) -> Iterator[Tuple[int, int, torch.nn.Module, Tuple[int, int], Tuple[int, int]]]:
    """``(stage, tokens per unit, attention module, window, shift)`` of every window-attention
    block of a visible-only encoder: Swin's blocks (``layers[i].blocks``) and Twins' locally
    grouped attention (``blocks[i]``, attention with a window ``ws``; its global attention has none)."""
    if hasattr(encoder, "layers") and all(hasattr(b, "window_size") for layer in encoder.layers for b in layer.blocks):
        for i, layer in enumerate(encoder.layers):
            t = encoder.unit // (encoder.patch_stride * 2 ** i)
            for block in layer.blocks:
                yield i, t, block.attn, tuple(block.window_size), tuple(block.shift_size)
    elif hasattr(encoder, "blocks") and hasattr(encoder, "tokens_per_unit"):
        for i, blocks in enumerate(encoder.blocks):
            for block in blocks:
                ws = getattr(block.attn, "ws", None)
                if isinstance(ws, int) and ws > 1:
                    yield i, encoder.tokens_per_unit(i), block.attn, (ws, ws), (0, 0)
    else:
        raise ValueError(f"{type(encoder).__name__} has no window attention that greenmim-bench knows (Swin or Twins)")


def encoder_partitions(encoder: torch.nn.Module) -> List[Partition]:
    """The distinct (stage, window, shift) partitions of a visible-only encoder: one grouping each."""
    seen: Dict[Partition, None] = {}
    for stage, t, _, window, shift in window_attention_blocks(encoder):
        seen.setdefault((stage, t, window, shift), None)
    if not seen:
        raise ValueError(f"{type(encoder).__name__} has no window-attention block: nothing to group")
    return list(seen)


def _stats(values: List[float]) -> Dict[str, float]:
    v = sorted(values)
    return {"median": statistics.median(v), "p90": v[min(len(v) - 1, int(round(0.9 * (len(v) - 1))))], "max": v[-1]}


def solver_benchmark(encoder: torch.nn.Module, batch_size: int, mask_ratio: float, num_masks: int, seed: int = 0) -> Dict[str, Any]:
    """Solver time and packing efficiency of every partition of ``encoder`` over ``num_masks`` masks
    of ``batch_size`` samples (per-sample masks, as in training)."""
    img_size = tuple(encoder.patch_embed.img_size)
    grid = unit_grid(img_size, encoder.unit)
    partitions = encoder_partitions(encoder)
    gen = torch.Generator().manual_seed(seed)
    per_part: Dict[Partition, Dict[str, list]] = {p: {"windows_ms": [], "solve_ms": [], "eff": [], "g": [], "n_g": [], "nw": [], "optimal": []} for p in partitions}
    layouts_ms: List[float] = []
    layouts_eff: List[float] = []
    cpu = torch.device("cpu")
    for _ in range(num_masks):
        mask = random_mask(batch_size, grid.num_units, mask_ratio, generator=gen).numpy()
        for p in partitions:
            _, t, window, shift = p
            t0 = time.perf_counter()
            win = stage_windows(mask, (grid.height, grid.width), t, window, shift)
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
        if hasattr(encoder, "build_layouts"):
            encoder.build_layouts(mask, grid, cpu)
            layouts_ms.append(float(encoder.last_grouping["ms"]))
            layouts_eff.append(float(encoder.last_grouping["efficiency"]))
    rows = []
    for (stage, t, window, shift), rec in per_part.items():
        rows.append({
            "stage": stage + 1,
            "window": list(window),
            "shift": list(shift),
            "windows": statistics.median(rec["nw"]),
            "capacity": window[0] * window[1],
            "group_size": statistics.median(rec["g"]),
            "num_groups": statistics.median(rec["n_g"]),
            "efficiency": statistics.fmean(rec["eff"]),
            "solve_ms": _stats(rec["solve_ms"]),
            "stage_windows_ms": _stats(rec["windows_ms"]),
            "optimal_fraction": statistics.fmean(rec["optimal"]),
        })
    total_solve = [sum(per_part[p]["solve_ms"][k] for p in partitions) for k in range(num_masks)]
    out: Dict[str, Any] = {
        "img_size": list(img_size),
        "batch_size": batch_size,
        "mask_ratio": mask_ratio,
        "masks": num_masks,
        "partitions": rows,
        "solve_ms_per_step": _stats(total_solve),
    }
    if layouts_ms:
        out["build_layouts_ms"] = _stats(layouts_ms)
        out["build_layouts_efficiency"] = statistics.fmean(layouts_eff)
    return out
