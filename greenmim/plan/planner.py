"""Planning a visible-only forward: mask -> visible units -> windows -> groups -> index vectors.

Everything a visible-only encoder needs from the mask is integer bookkeeping on small arrays, and
none of it depends on the images or the weights. It is therefore done on the host, ahead of the
step, by a picklable :class:`VisiblePlanner` (in the trainer: inside the DataLoader workers, next
to image decoding; see :mod:`greenmim.plan.collate`). Its result, a :class:`HostPlan`, holds
CPU int tensors only (O(N) in the visible tokens); the training thread pins nothing and computes
nothing: it copies the plan to the device with :meth:`HostPlan.to` (asynchronous from pinned
memory), and the O(n_g * g^2) pair tensors are derived there, on the device.

A step planned this way never reads a device value on the host: the mask checks run on the host
mask, and the visible indices the decoder scatters with come from the plan.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Dict, Hashable, List, Optional, Tuple

import numpy as np
import torch

from .grouping import DEFAULT_COST_MODEL, CostModel
from .masking import UnitGrid, check_mask, visible_indices
from ..ops.group_attention import GroupLayout
from .slots import GroupSlots, plan_group_slots
from .geometry import neighbour_index
from .windows import stage_windows
from .static_shapes import StaticShape, fit_static_shapes


@dataclass(frozen=True)
class WindowPartition:
    """One windowed attention to plan: blocks of ``stage`` with this ``window`` and ``shift`` share
    the layout stored under ``key``."""

    stage: int
    key: Hashable
    window: Tuple[int, int]
    shift: Tuple[int, int]


@dataclass
class HostPlan:
    """A planned batch, all CPU tensors.

    Attributes:
        grid: the unit grid.
        mask: ``(B, num_units)`` bool, True = masked.
        vis_idx: ``(B, N_vis)`` long, the visible units in ascending raster order.
        layouts: per stage, ``{partition key: GroupSlots}``.
        neighbours: ``{t: (B * N_vis * t * t, 9) int32}`` 3x3 neighbour indices of the stages with a
            submanifold conv (Twins' PEG), keyed by tokens per unit side.
        plan_ms: host time spent planning (wherever it ran).
        inline: True when planned on the training thread (not ahead of the step in a worker).
        relative_bias: the attention adds Swin's relative position bias (else a window mask: Twins).
        attention: the encoder's attention implementation (``"sdpa"``: the device derives per-pair
            bias indices or window masks; ``"flex"``: none, the kernel reads the slot vectors).
    """

    grid: UnitGrid
    mask: torch.Tensor
    vis_idx: torch.Tensor
    layouts: List[Dict[Hashable, GroupSlots]]
    neighbours: Dict[int, torch.Tensor] = field(default_factory=dict)
    plan_ms: float = 0.0
    inline: bool = False
    relative_bias: bool = True
    attention: str = "sdpa"

    def _map(self, fn) -> "HostPlan":
        layouts = [
            {k: replace(s, **{n: fn(t) for n, t in s.tensors().items()}) for k, s in stage.items()}
            for stage in self.layouts
        ]
        return replace(
            self,
            mask=fn(self.mask),
            vis_idx=fn(self.vis_idx),
            layouts=layouts,
            neighbours={t: fn(v) for t, v in self.neighbours.items()},
        )

    def pin_memory(self) -> "HostPlan":
        """Pinned copy (the DataLoader's pin-memory thread calls this), so device copies are async."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device) -> "DevicePlan":
        """Copy the plan's tensors to ``device`` (non-blocking; no device value is read back)."""
        device = torch.device(device)
        return DevicePlan(
            host=self,
            mask=self.mask.to(device, non_blocking=True),
            vis_idx=self.vis_idx.to(device, non_blocking=True),
            layouts=[
                {k: GroupLayout.from_slots(s, device, self.relative_bias, self.attention) for k, s in stage.items()} for stage in self.layouts
            ],
            neighbours={t: v.to(device, non_blocking=True) for t, v in self.neighbours.items()},
        )

    def stats(self) -> Dict[str, float]:
        """``ms`` (planning time), ``efficiency`` (visible tokens per allocated attention slot over
        all windowed attentions), ``inline`` (1.0 if planned on the training thread)."""
        slots = sum(s.num_slots for stage in self.layouts for s in stage.values())
        tokens = sum(s.tokens for stage in self.layouts for s in stage.values())
        return {"ms": self.plan_ms, "efficiency": tokens / slots if slots else 1.0, "inline": float(self.inline)}

    @property
    def overflow(self) -> int:
        """Layouts of a static plan that outgrew their static shape (0 for a free plan)."""
        return sum(s.overflow for stage in self.layouts for s in stage.values())


@dataclass
class DevicePlan:
    """A :class:`HostPlan` on the device: what the encoder's forward consumes.

    ``mask`` and ``vis_idx`` are device copies; ``host`` keeps the CPU originals (the mask checks
    and numpy geometry read those, never the device copies).
    """

    host: HostPlan
    mask: torch.Tensor
    vis_idx: torch.Tensor
    layouts: List[Dict[Hashable, GroupLayout]]
    neighbours: Dict[int, torch.Tensor]

    @property
    def grid(self) -> UnitGrid:
        return self.host.grid


@dataclass
class VisiblePlanner:
    """Plans visible-only forwards of one encoder geometry (picklable: ships to loader workers).

    Args:
        grid: the unit grid of the encoder's image size.
        tokens_per_unit: tokens per unit side of each stage (8, 4, 2, 1 for Swin/Twins).
        partitions: the windowed attentions to plan.
        peg_stages: stages whose submanifold 3x3 conv needs neighbour indices (Twins).
        cost_model: the attention cost the grouping solver minimises.
        group_multiple: group sizes restricted to multiples of this (8 on CUDA: aligned keys for
            the fused attention kernels; 1 on CPU).
        pad_groups_to: pad the group count to a multiple of this (bucketed shapes), 0 = off.
        relative_bias: the windowed attentions add Swin's relative position bias (Twins': none).
        attention: the encoder's attention implementation, ``"sdpa"`` or ``"flex"`` (what
            :meth:`HostPlan.to` derives on the device).
        static: fixed shapes: every plan of one batch size and visible count has the same tensor
            shapes (one ``(n_g, g)`` per layout, sized once per batch shape by
            :func:`~greenmim.plan.static_shapes.fit_static_shapes`; a rare overflowing batch gets a
            larger shape, still exact). For ``torch.compile`` and CUDA graphs; the free solver
            (False) does less attention work.
        shared_mask: every row of a mask is the same (one mask per batch): the layouts are planned
            on one sample and broadcast over the batch.
    """

    grid: UnitGrid
    tokens_per_unit: Tuple[int, ...]
    partitions: Tuple[WindowPartition, ...]
    peg_stages: Tuple[int, ...] = ()
    cost_model: CostModel = DEFAULT_COST_MODEL
    group_multiple: int = 1
    pad_groups_to: int = 0
    relative_bias: bool = True
    attention: str = "sdpa"
    static: bool = False
    shared_mask: bool = False
    _static_shapes: Dict[Tuple[int, int], Dict[Tuple[int, Hashable], StaticShape]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def static_shapes(self, rows: int, num_visible: int) -> Dict[Tuple[int, Hashable], StaticShape]:
        """``{(stage, partition key): StaticShape}`` for ``rows`` planned masks of ``num_visible``
        visible units (sized on first use, then cached; deterministic)."""
        key = (rows, num_visible)
        if key not in self._static_shapes:
            self._static_shapes[key] = fit_static_shapes(
                self.partitions, (self.grid.height, self.grid.width), self.tokens_per_unit, rows, num_visible,
                self.cost_model, self.group_multiple,
            )
        return self._static_shapes[key]

    def plan(self, mask: torch.Tensor) -> HostPlan:
        """Plan a batch from its host mask ``(B, num_units)`` bool (True = masked).

        A mask on an accelerator is copied to the host first: that waits for the device, so the
        trainer and the benchmark plan from host masks, ahead of the step.
        """
        t0 = time.perf_counter()
        mask = check_mask(mask.detach().cpu(), mask.shape[0], self.grid.num_units)
        mask_np = mask.numpy()
        if self.shared_mask and not (mask_np == mask_np[:1]).all():
            raise ValueError(
                "this planner is for shared masks (one per batch) but the mask rows differ: "
                "draw the masks with shared=True or plan with shared_mask=False"
            )
        grouped = mask_np[:1] if self.shared_mask else mask_np  # the rows the layouts are planned on
        shapes = self.static_shapes(grouped.shape[0], int((~grouped[0]).sum())) if self.static else {}
        hw = (self.grid.height, self.grid.width)
        layouts: List[Dict[Hashable, GroupSlots]] = [{} for _ in self.tokens_per_unit]
        for part in self.partitions:
            if part.key in layouts[part.stage]:
                continue
            win = stage_windows(grouped, hw, self.tokens_per_unit[part.stage], part.window, part.shift)
            layouts[part.stage][part.key] = plan_group_slots(
                win, self.cost_model, group_multiple=self.group_multiple, pad_groups_to=self.pad_groups_to,
                static=shapes.get((part.stage, part.key)), broadcast=self.shared_mask,
            )
        neighbours = {}
        for stage in self.peg_stages:
            t = self.tokens_per_unit[stage]
            neighbours[t] = torch.from_numpy(neighbour_index(mask_np, hw, t).astype(np.int32))
        return HostPlan(
            grid=self.grid,
            mask=mask,
            vis_idx=visible_indices(mask),
            layouts=layouts,
            neighbours=neighbours,
            plan_ms=(time.perf_counter() - t0) * 1e3,
            relative_bias=self.relative_bias,
            attention=self.attention,
        )


def host_plan(plan: "HostPlan | DevicePlan") -> HostPlan:
    """The host side of a plan (the plan itself, or a device plan's ``host``)."""
    return plan.host if isinstance(plan, DevicePlan) else plan


def as_device_plan(plan: "HostPlan | DevicePlan", device: torch.device) -> DevicePlan:
    """``plan`` on ``device`` (copied if it is still a :class:`HostPlan`)."""
    return plan if isinstance(plan, DevicePlan) else plan.to(device)


def planned_mask(plan: Optional["HostPlan | DevicePlan"]) -> Optional[torch.Tensor]:
    """The host mask of a plan (None for None)."""
    return None if plan is None else host_plan(plan).mask
