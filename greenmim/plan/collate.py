"""Pretraining batches whose masks are drawn and planned in the DataLoader workers.

A visible-only step needs, besides the images, the mask and its plan (windows, groups, slot and
neighbour indices: :mod:`greenmim.plan.planner`). Both are host work on small integer arrays that
depend on nothing but the mask, so :class:`MaskCollator` does them where the images are decoded,
ahead of the step and off the training thread. The training thread receives a :class:`MIMBatch`
whose tensors the loader has already pinned, and only issues asynchronous copies.

Masks are drawn from each sample's seed (the sampler's ``(index, seed)`` pairs, see
:class:`~greenmim.engine.sampler.ResumableDistributedSampler`), so they depend on
``(seed, epoch, index)`` only: the same for any ``num_workers`` and after a mid-epoch resume.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch.utils.data import default_collate

from .masking import UnitGrid, check_mask, num_visible_units, seeded_masks, visible_indices
from ..data.device_decode import EncodedBatch, EncodedImage
from .planner import DevicePlan, HostPlan, VisiblePlanner, as_device_plan, planned_mask


@dataclass
class MIMBatch:
    """Images and the plan of their masks (``plan.mask``: ``(B, num_units)`` bool, True = masked).
    For the all-token baseline the plan holds the mask and visible indices only.

    ``images``: uint8 pixels ``(B, 3, H, W)`` (the step normalises them on the device:
    :func:`~greenmim.data.transforms.normalize`), or with ``data.decode=device`` an
    :class:`~greenmim.data.device_decode.EncodedBatch` that ``.to(device)`` decodes into them."""

    images: "torch.Tensor | EncodedBatch"
    plan: "HostPlan | DevicePlan"

    @property
    def mask(self) -> torch.Tensor:
        """The host mask ``(B, num_units)``."""
        return planned_mask(self.plan)

    def pin_memory(self) -> "MIMBatch":
        """Called by the DataLoader's pin-memory thread (``pin_memory=True``)."""
        return MIMBatch(self.images.pin_memory(), self.plan.pin_memory())

    def to(self, device: torch.device) -> "MIMBatch":
        """Images and plan on ``device`` (asynchronous copies from pinned memory; the plan's pair
        tensors are derived there). :class:`~greenmim.data.prefetch.DevicePrefetcher` calls it ahead."""
        return MIMBatch(self.images.to(device, non_blocking=True), as_device_plan(self.plan, device))

    def __len__(self) -> int:
        return len(self.images)


class MaskCollator:
    """``collate_fn`` for ``(image, seed)`` samples: stacks the images (or gathers the encoded ones
    of ``data.decode=device``), draws each sample's mask from
    its seed and plans the batch (picklable; runs in the loader workers).

    Args:
        grid: the unit grid of the images.
        mask_ratio: fraction of masked units.
        planner: the visible-only encoder's planner, or None for the all-token baseline (mask only).
        shared: one mask per batch (the first sample's) instead of one per sample.
        batch_size: the loader's batch size: a static planner sizes its shapes for it here, once, in
            the process that builds the loader, instead of in every worker on its first batch.
    """

    def __init__(self, grid: UnitGrid, mask_ratio: float, planner: Optional[VisiblePlanner] = None, shared: bool = False,
                 batch_size: Optional[int] = None):
        self.grid = grid
        self.mask_ratio = float(mask_ratio)
        self.planner = planner
        self.shared = bool(shared)
        if planner is not None and planner.static and batch_size:
            rows = 1 if planner.shared_mask else int(batch_size)
            planner.static_shapes(rows, num_visible_units(grid.num_units, self.mask_ratio))

    def __call__(self, samples: Sequence[Tuple[torch.Tensor, int]]) -> MIMBatch:
        images = [image for image, _ in samples]
        images = EncodedBatch(images) if isinstance(images[0], EncodedImage) else default_collate(images)
        seeds: List[int] = [int(seed) for _, seed in samples]
        mask = seeded_masks(seeds, self.grid.num_units, self.mask_ratio, shared=self.shared)
        return MIMBatch(images, plan_masks(mask, self.grid, self.planner))


def planner_for(model, device: torch.device, static: Optional[bool] = None) -> Optional[VisiblePlanner]:
    """The planner a loader uses for pretraining ``model`` on ``device``: the visible-only encoder's,
    on CUDA with group sizes in multiples of 8 (aligned keys for the fused attention kernels) and
    static shapes (one shape per batch size and mask ratio, for ``torch.compile`` and CUDA graphs;
    on the CPU the free solver's smaller attention work wins); broadcasting one sample's layouts
    when the model shares one mask per batch. None for the all-token baseline (masks only).
    ``static=True`` asks for static shapes on any device (a compiled step: no recompiles)."""
    encoder = model.encoder
    if not encoder.visible_only:
        return None
    cuda = torch.device(device).type == "cuda"
    static = cuda if static is None else bool(static)
    return encoder.planner(group_multiple=8 if cuda else 1, static=static, shared_mask=model.shared_mask)


def plan_masks(mask: torch.Tensor, grid: UnitGrid, planner: Optional[VisiblePlanner]) -> HostPlan:
    """The plan of host masks ``(B, num_units)``, checked here (:func:`~greenmim.plan.masking.check_mask`):
    the full plan with a planner, else (all-token baseline) just the mask and its visible indices."""
    if planner is not None:
        return planner.plan(mask)  # checks the mask
    mask = check_mask(mask, mask.shape[0], grid.num_units)
    return HostPlan(grid=grid, mask=mask, vis_idx=visible_indices(mask), layouts=[])
