"""What the pretraining encoders share.

:class:`EncoderGeometryMixin` (every encoder): the mask unit, tokens per unit, input checks. It
needs ``patch_embed``, ``patch_stride`` and ``num_stages`` from the encoder.

:class:`VisibleEncoderMixin` (the visible-only encoders): planning and the forward. An encoder
lists its windowed attentions (:meth:`window_partitions`) and the stages with a submanifold conv
(:attr:`peg_stages`), and computes its stages from a device plan (:meth:`stages_from_plan`);
:meth:`planner` turns the geometry into a picklable :class:`~greenmim.plan.planner.VisiblePlanner` for
the DataLoader workers, and :meth:`device_plan` resolves what a forward was given (a mask, a host
plan or a device plan).
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..plan.masking import UnitGrid, check_mask, unit_grid
from ..plan.geometry import VisibleGeometry
from ..plan.planner import DevicePlan, HostPlan, VisiblePlanner, WindowPartition, as_device_plan, host_plan

Plan = Union[HostPlan, DevicePlan]


class EncoderGeometryMixin:
    """Mask-unit geometry and input checks of the pretraining encoders."""

    @property
    def unit(self) -> int:
        """Mask unit in pixels: the encoder's total stride."""
        return self.patch_stride * 2 ** (self.num_stages - 1)

    def tokens_per_unit(self, stage: int) -> int:
        return self.unit // (self.patch_stride * 2 ** stage)

    def check_images(self, images: torch.Tensor) -> UnitGrid:
        """The unit grid of ``images`` ``(B, 3, H, W)``; a ValueError naming the fix if it does not fit
        (shape checks only: no device value is read)."""
        expected = tuple(self.patch_embed.img_size)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        grid = unit_grid(images.shape[-2:], self.unit)
        if tuple(images.shape[-2:]) != expected:
            raise ValueError(
                f"this encoder was built for {expected[0]}x{expected[1]} images, got "
                f"{images.shape[-2]}x{images.shape[-1]}: build it with img_size={images.shape[-2]} "
                f"(or set data.img_size to {expected[0]})"
            )
        return grid

    def embed_with_mask_tokens(
        self, images: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor, checked: bool = False
    ) -> torch.Tensor:
        """The all-token baselines' input: the patch embedding ``(B, H', W', C)`` of ``images`` with
        ``mask_token`` at every token of a hidden unit. ``mask`` is checked where it lives (a device
        mask is not read back: no sync), unless ``checked`` (checked where it was planned; the check
        would break a ``torch.compile`` graph)."""
        grid = self.check_images(images)
        if mask.device.type == "cpu" and not checked:
            mask = check_mask(mask, images.shape[0], grid.num_units)
        mask = mask.to(images.device, non_blocking=True)
        x = self.patch_embed(images)  # (B, H, W, C)
        b, h, w, c = x.shape
        t = h // grid.height
        token_mask = mask.view(b, grid.height, 1, grid.width, 1).expand(-1, -1, t, -1, t).reshape(b, h, w, 1)
        return torch.where(token_mask, mask_token.to(x.dtype).view(1, 1, 1, c), x)

    def use_fused_attention(self) -> None:
        """Make every timm attention module of this encoder run ``F.scaled_dot_product_attention``
        (timm's Swin defaults to its unfused bmm + softmax: a weak baseline). Same weights, same
        results up to float rounding."""
        for module in self.modules():
            if module is not self and hasattr(module, "fused_attn"):
                module.fused_attn = True



class VisibleEncoderMixin(EncoderGeometryMixin):
    """Planning and the forward of the visible-only encoders.

    ``forward(images, mask)`` or ``forward(images, plan=plan)`` -> ``(B, N_vis, C)`` final-stage
    features of the visible units in ascending raster order, final norm applied.
    """

    peg_stages: Tuple[int, ...] = ()
    relative_bias = True  # windowed attention with Swin's relative position bias (Twins: False)
    attention = "sdpa"  # the windowed attention's implementation (see greenmim.ops.group_attention)
    last_grouping: Dict[str, float]

    def stages_from_plan(self, images: torch.Tensor, plan: DevicePlan) -> List[torch.Tensor]:
        """The encoder's stages on the visible units of ``plan`` (see :meth:`forward_stages`)."""
        raise NotImplementedError

    def forward_stages(
        self, images: torch.Tensor, mask: Optional[torch.Tensor] = None, plan: Optional[Plan] = None
    ) -> List[torch.Tensor]:
        """Per-stage outputs (before the final norm): stage ``i`` is ``(B, N_vis * t_i^2, C_i)``,
        unit-major with ``t_i = 8 >> i`` tokens per unit side (see :func:`greenmim.plan.windows.tokens_to_grid`).
        Give the ``mask`` or its ``plan`` (see :meth:`device_plan`)."""
        return self.stages_from_plan(images, self.device_plan(images, mask, plan))

    def forward(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None, plan: Optional[Plan] = None) -> torch.Tensor:
        return self.forward_plan(images, self.device_plan(images, mask, plan))

    def forward_plan(self, images: torch.Tensor, plan: DevicePlan) -> torch.Tensor:
        """:meth:`forward` on a plan :meth:`device_plan` already resolved (the pretraining model's
        call: resolving it once keeps one graph break under ``torch.compile``)."""
        return self.norm(self.stages_from_plan(images, plan)[-1])

    def window_partitions(self) -> Iterator[WindowPartition]:
        """The windowed attentions to plan (possibly repeated keys)."""
        raise NotImplementedError

    def planner(
        self, group_multiple: int = 1, pad_groups_to: int = 0, static: bool = False, shared_mask: bool = False
    ) -> VisiblePlanner:
        """A picklable planner for this encoder's geometry (see :class:`~greenmim.plan.planner.VisiblePlanner`:
        ``static`` fixes every plan's shapes per batch size and mask ratio, ``shared_mask`` plans one
        sample of a batch that shares one mask)."""
        return VisiblePlanner(
            grid=unit_grid(tuple(self.patch_embed.img_size), self.unit),
            tokens_per_unit=tuple(self.tokens_per_unit(i) for i in range(self.num_stages)),
            partitions=tuple(self.window_partitions()),
            peg_stages=tuple(self.peg_stages),
            cost_model=self.cost_model,
            group_multiple=group_multiple,
            pad_groups_to=pad_groups_to,
            relative_bias=self.relative_bias,
            attention=self.attention,
            static=static,
            shared_mask=shared_mask,
        )

    @torch.compiler.disable
    def sparse_geometry(self, plan: DevicePlan) -> VisibleGeometry:
        """The sparse convolutions' geometry of ``plan`` (its neighbour indices, planned ahead)."""
        grid = (plan.grid.height, plan.grid.width)
        return VisibleGeometry(plan.host.mask.numpy(), grid, plan.vis_idx.device, neighbours=plan.neighbours)

    @torch.compiler.disable
    def device_plan(self, images: torch.Tensor, mask: Optional[torch.Tensor], plan: Optional[Plan]) -> DevicePlan:
        """The plan of this forward on the images' device.

        ``plan`` (from a loader, see :mod:`greenmim.plan.collate`) is used as given; without one
        the mask is planned here, on the training thread (fine for inference and tests; a mask
        on an accelerator then costs a device sync), broadcast over the batch when its rows are
        all equal (a shared mask). Runs eagerly under ``torch.compile``.
        """
        grid = self.check_images(images)
        if plan is None:
            if mask is None:
                raise ValueError("pass a mask (B, num_units) or a plan")
            mask = mask.detach().cpu()
            shared = mask.dim() == 2 and mask.shape[0] > 1 and bool((mask == mask[:1]).all())
            plan = self.planner(shared_mask=shared).plan(mask)
            plan.inline = True
        host = host_plan(plan)
        if host.grid != grid:
            raise ValueError(f"the plan is for a {host.grid} unit grid, the images give {grid}: plan with this encoder")
        if len(host.layouts) != self.num_stages:
            raise ValueError("the plan has no group layouts for this encoder: plan it with encoder.planner()")
        if host.mask.shape[0] != images.shape[0]:
            raise ValueError(f"the plan has {host.mask.shape[0]} masks for a batch of {images.shape[0]} images")
        self.last_grouping = host.stats()
        return as_device_plan(plan, images.device)


def visible_unit_pixels(images: torch.Tensor, vis_idx: torch.Tensor, grid: UnitGrid) -> torch.Tensor:
    """The pixel blocks of the visible units: ``(B, 3, H, W)`` -> ``(B, N_vis, 3, unit, unit)``,
    in the order of ``vis_idx`` ``(B, N_vis)``."""
    b, c = images.shape[:2]
    u = grid.unit
    units = images.reshape(b, c, grid.height, u, grid.width, u).permute(0, 2, 4, 1, 3, 5)
    units = units.reshape(b, grid.num_units, c, u, u)
    return torch.gather(units, 1, vis_idx.view(b, -1, 1, 1, 1).expand(-1, -1, c, u, u))


def visible_unit_windows(images: torch.Tensor, mask: torch.Tensor, vis_idx: torch.Tensor, grid: UnitGrid, border: int) -> torch.Tensor:
    """The visible units with a ``border`` of their neighbours' pixels: ``(B, 3, H, W)`` ->
    ``(B, N_vis, 3, unit + 2 * border, unit + 2 * border)`` in the order of ``vis_idx`` ``(B, N_vis)``.

    Pixels of hidden units (``mask`` ``(B, num_units)``, True = hidden) and outside the image are
    zero, so a conv with padding ``border`` over the image with hidden pixels zeroed equals, at a
    visible unit's positions, the same conv without padding over its window (PVTv2's 7x7 stride-4 stem)."""
    b, c, h, w = images.shape
    u = grid.unit
    keep = (~mask).view(b, 1, grid.height, 1, grid.width, 1)
    x = images.view(b, c, grid.height, u, grid.width, u)
    x = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)).view(b, c, h, w)
    size = u + 2 * border
    windows = F.pad(x, (border,) * 4).unfold(2, size, u).unfold(3, size, u)  # (B, 3, gh, gw, size, size), a view
    rows = torch.arange(b, device=vis_idx.device).view(b, 1)
    return windows[rows, :, vis_idx // grid.width, vis_idx % grid.width]  # copies the visible windows only
