"""Swin encoders: visible-only (greenmim) and all-token (simmim baseline).

Both subclass timm's :class:`~timm.models.swin_transformer.SwinTransformer`, so their parameters
have timm's names and layouts and ``load_state_dict(timm_model.state_dict(), strict=False)`` leaves
only the classifier head over.

:class:`VisibleSwin` runs on the visible mask units only:

* patch embedding on the visible units' pixels (a kernel=stride conv never crosses a unit);
* tokens kept unit-major (see :mod:`greenmim.plan.windows`), so patch merging is a reshape;
* window attention through :func:`~greenmim.ops.group_attention.group_window_attention`, with one
  grouping per stage and window partition, shared by the blocks of that stage.

At mask ratio 0 its output equals timm's ``forward_features``; at ratio > 0 it equals a dense Swin
whose attention ignores masked keys.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn
from timm.models.swin_transformer import SwinTransformer
from torch.utils.checkpoint import checkpoint

from ..plan.grouping import DEFAULT_COST_MODEL, CostModel
from ..ops.group_attention import GroupLayout, check_attention, group_window_attention
from ..ops.sparse_conv import SPARSE_BACKENDS
from ..plan.planner import DevicePlan, WindowPartition
from .geometry import EncoderGeometryMixin, VisibleEncoderMixin, visible_unit_pixels
from .registry import EncoderSpec, register_encoder

class VisibleSwinMixin(VisibleEncoderMixin):
    """The visible-only forward of timm's Swin layouts (V1 here, V2 in :mod:`.swinv2`): a subclass
    of this and a timm Swin model overrides :meth:`block_forward` where its block differs."""

    visible_only = True
    merge_norm_first = True  # V1's patch merging: norm, then reduction (V2: reduction, then norm)

    def __init__(
        self,
        *args: Any,
        cost_model: CostModel = DEFAULT_COST_MODEL,
        fused_attn: bool = True,
        sparse_backend: str = "auto",
        attention: str = "sdpa",
        **kwargs: Any,
    ):
        # Swin's only convolution is the kernel=stride patch embedding, which runs on the visible
        # units' pixels directly; `sparse_backend` is accepted for a uniform interface with Twins.
        if sparse_backend not in SPARSE_BACKENDS:
            raise ValueError(f"sparse_backend must be one of {SPARSE_BACKENDS}, got '{sparse_backend}'")
        super().__init__(*args, **kwargs)
        self.patch_stride = self.patch_embed.patch_size[0]
        self.num_stages = self.num_layers
        self.cost_model = cost_model
        self.fused_attn = fused_attn
        self.attention = check_attention(attention)
        self.last_grouping: Dict[str, float] = {}

    def window_partitions(self):
        for i, layer in enumerate(self.layers):
            for block in layer.blocks:
                key = (tuple(block.window_size), tuple(block.shift_size))
                yield WindowPartition(i, key, key[0], key[1])

    # -- forward ----------------------------------------------------------------------------------
    def embed_visible(self, images: torch.Tensor, vis_idx: torch.Tensor, grid) -> torch.Tensor:
        """Patch-embed the visible units: ``(B, N_vis * t * t, C)`` unit-major tokens."""
        b = vis_idx.shape[0]
        units = visible_unit_pixels(images, vis_idx, grid)
        x = self.patch_embed.proj(units.flatten(0, 1))  # (B*N_vis, C, t, t)
        x = x.flatten(2).transpose(1, 2).reshape(b, -1, x.shape[1])
        return self.patch_embed.norm(x)

    def block_forward(self, block: nn.Module, x: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
        b, n, c = x.shape
        attn = block.attn
        h = group_window_attention(
            block.norm1(x).reshape(b * n, c),
            layout,
            attn.qkv,
            attn.proj,
            attn.num_heads,
            attn.relative_position_bias_table,
            attn_drop=attn.attn_drop.p if self.training else 0.0,
            fused=self.fused_attn,
            attention=self.attention,
        )
        x = x + block.drop_path1(attn.proj_drop(h).view(b, n, -1))
        return x + block.drop_path2(block.mlp(block.norm2(x)))

    def stage_forward(self, i: int, x: torch.Tensor, layouts: Dict[Tuple, GroupLayout]) -> torch.Tensor:
        layer = self.layers[i]
        if i > 0:
            x = merge_patches(x, self.tokens_per_unit(i - 1), layer.downsample, self.merge_norm_first)
        for block in layer.blocks:
            layout = layouts[(tuple(block.window_size), tuple(block.shift_size))]
            if layer.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(self.block_forward, block, x, layout, use_reentrant=False)
            else:
                x = self.block_forward(block, x, layout)
        return x

    def stages_from_plan(self, images: torch.Tensor, plan: DevicePlan) -> List[torch.Tensor]:
        x = self.embed_visible(images, plan.vis_idx, plan.grid)
        outs = []
        for i in range(self.num_stages):
            x = self.stage_forward(i, x, plan.layouts[i])
            outs.append(x)
        return outs


class VisibleSwin(VisibleSwinMixin, SwinTransformer):
    """Swin encoder that computes on visible mask units only.

    ``forward(images, mask)``: images ``(B, 3, H, W)``, mask ``(B, num_units)`` bool (True = masked,
    equal visible count per sample) -> ``(B, N_vis, C)`` final-stage features of the visible units
    in ascending raster order, final norm applied. ``forward(images, plan=plan)`` takes the mask's
    plan instead (planned ahead, e.g. in the DataLoader workers: see :mod:`greenmim.plan.planner`).

    ``attention``: ``"sdpa"`` (default) or ``"flex"`` (FlexAttention, the relative-position bias read
    from its table inside the kernel; see :mod:`greenmim.ops.group_attention`).
    """


def merge_patches(x: torch.Tensor, t: int, downsample: nn.Module, norm_first: bool = True) -> torch.Tensor:
    """Swin's 2x2 patch merging on unit-major tokens: ``(B, N_u*t*t, C) -> (B, N_u*(t/2)^2, C')``.

    Channel order matches timm's PatchMerging (V1 and V2): (0,0), (1,0), (0,1), (1,1) as (row, col)
    offsets. ``norm_first``: V1's norm-then-reduction; False: V2's reduction-then-norm.
    """
    b, n, c = x.shape
    n_units = n // (t * t)
    h = t // 2
    x = x.view(b, n_units, h, 2, h, 2, c).permute(0, 1, 2, 4, 5, 3, 6).reshape(b, n_units * h * h, 4 * c)
    if norm_first:
        return downsample.reduction(downsample.norm(x))
    return downsample.norm(downsample.reduction(x))


class AllTokenSwinMixin(EncoderGeometryMixin):
    """The SimMIM-style baseline of timm's Swin layouts (V1 here, V2 in :mod:`.swinv2`): timm's model
    over all tokens, a mask token in place of hidden patches.

    ``forward(images, mask, mask_token)`` -> ``(B, num_units, C)`` final features of every unit.
    Its window attention runs fused (``scaled_dot_product_attention``), like the visible-only one.
    """

    visible_only = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.patch_stride = self.patch_embed.patch_size[0]
        self.num_stages = self.num_layers
        self.use_fused_attention()

    def forward(self, images: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor, checked: bool = False) -> torch.Tensor:
        """See :meth:`~greenmim.models.geometry.EncoderGeometryMixin.embed_with_mask_tokens` for ``mask``
        and ``checked``."""
        x = self.norm(self.layers(self.embed_with_mask_tokens(images, mask, mask_token, checked)))
        return x.reshape(x.shape[0], -1, x.shape[-1])


class AllTokenSwin(AllTokenSwinMixin, SwinTransformer):
    """The all-token Swin (V1) baseline (see :class:`AllTokenSwinMixin`)."""


SWIN_ARCHS = {
    "swin_tiny_patch4_window7_224": dict(img_size=224, patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_small_patch4_window7_224": dict(img_size=224, patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_base_patch4_window7_224": dict(img_size=224, patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "swin_base_patch4_window12_384": dict(img_size=384, patch_size=4, window_size=12, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "swin_large_patch4_window7_224": dict(img_size=224, patch_size=4, window_size=7, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    "swin_large_patch4_window12_384": dict(img_size=384, patch_size=4, window_size=12, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}

for _name, _args in SWIN_ARCHS.items():
    register_encoder(EncoderSpec(_name, "swin", _args, VisibleSwin, AllTokenSwin))
