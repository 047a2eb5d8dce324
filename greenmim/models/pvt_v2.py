"""PVTv2 encoders: visible-only (greenmim) and all-token (simmim baseline).

Both subclass timm's :class:`~timm.models.pvt_v2.PyramidVisionTransformerV2`, so their parameters
have timm's names and layouts and ``load_state_dict(timm_model.state_dict(), strict=False)`` leaves
only the classifier head over. timm's PVTv2 takes no ``img_size`` (it is convolutional in its
size); these encoders take one (default 224) for their mask-unit grid and keep it in
``patch_embed.img_size``.

:class:`VisiblePVTv2` runs on the visible mask units only (unit = total stride = 32 px), tokens
unit-major (see :mod:`greenmim.plan.windows`; ``t = 8, 4, 2, 1`` tokens per unit side):

* the overlapping stem (7x7, stride 4, padding 3): each visible unit's pixels with a 3 px border of
  its neighbours (hidden units' and out-of-image pixels zero), then the same conv without padding:
  ``t x t`` outputs per unit (:func:`~greenmim.models.geometry.visible_unit_windows`);
* the overlapping downsamplings (3x3, stride 2, padding 1) between stages: a gather of the 9
  inputs of every visible output (hidden and out-of-image inputs zero) and one matrix product
  (:func:`~greenmim.ops.sparse_conv.submanifold_conv3x3_stride2`);
* the MLP's 3x3 depthwise conv (8x the stage width): the submanifold conv of Twins' PEG (masked
  neighbours zero), computed on per-unit tiles (:func:`~greenmim.ops.sparse_conv.tiled_depthwise3x3`);
* spatial-reduction attention: queries are the visible tokens, keys and values the kernel == stride
  reduction (sr 8/4/2, equal to ``t``: one key per unit) of the visible units, or the visible tokens
  themselves where sr is 1 (:func:`~greenmim.ops.reduced_attention.reduced_attention`).

So every convolution equals the dense one on a map whose hidden positions are zero, read back at the
visible positions, and no hidden position is an attention key: at mask ratio 0 the output equals
timm's ``forward_features``; at ratio > 0 it equals the dense PVTv2 with hidden positions zeroed
before every convolution and never attended to. The linear-SRA variant (``pvt_v2_b2_li``,
``linear=True``) is refused: it average-pools keys to a fixed 7x7 grid across unit borders.

The stem's padding at image borders is timm's: out-of-image pixels are zero, the same as hidden ones.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.pvt_v2 import PyramidVisionTransformerV2
from torch.utils.checkpoint import checkpoint

from ..plan.grouping import DEFAULT_COST_MODEL, CostModel
from ..plan.masking import to_pair
from ..ops.reduced_attention import reduced_attention
from ..plan.geometry import VisibleGeometry
from ..ops.sparse_conv import check_conv3x3_stride2, get_sparse_backend, tiled_depthwise3x3, unit_tiles
from ..plan.planner import DevicePlan
from .geometry import EncoderGeometryMixin, VisibleEncoderMixin, visible_unit_windows
from .registry import EncoderSpec, refuse_encoder, register_encoder

LINEAR_SRA_HINT = (
    "PVTv2's linear SRA (pvt_v2_b2_li, linear=True) average-pools the keys to a fixed 7x7 grid over the whole "
    "image, mixing hidden and visible mask units, so it cannot run on visible tokens: use pvt_v2_b2 (the same "
    "network with unit-aligned spatial reduction) or linear=False"
)


class PVTv2EncoderMixin(EncoderGeometryMixin):
    """The mask-unit geometry of timm's PVTv2 (``img_size`` kept in ``patch_embed.img_size``)."""

    def _init_geometry(self, img_size: Any) -> None:
        self.patch_embed.img_size = to_pair(img_size)
        self.patch_stride = self.patch_embed.proj.stride[0]
        self.num_stages = len(self.stages)

    @property
    def embed_dim(self) -> int:
        """Width of the first stage (the simmim mask token's width)."""
        return self.patch_embed.proj.out_channels


class VisiblePVTv2(VisibleEncoderMixin, PVTv2EncoderMixin, PyramidVisionTransformerV2):
    """PVTv2 encoder that computes on visible mask units only.

    ``forward(images, mask)`` or ``forward(images, plan=plan)``: images ``(B, 3, H, W)``, mask
    ``(B, num_units)`` bool (True = masked, equal visible count per sample) -> ``(B, N_vis, C)``
    final-stage features of the visible units in ascending raster order. Every PVTv2 stage ends with
    its own LayerNorm (timm's ``stages.i.norm``), so the stage outputs of :meth:`forward_stages`
    include it and there is no further final norm.

    Args (besides timm's PVTv2 arguments):
        img_size: the image size ``H`` or ``(H, W)`` (multiples of 32), for the unit grid.
        cost_model: accepted for a uniform interface (PVTv2 has no windowed attention to group).
        fused_attn: use ``scaled_dot_product_attention``; False runs the plain reference path.
        sparse_backend: ``'auto'`` | ``'spconv'`` | ``'native'`` (see :mod:`greenmim.ops.sparse_conv`).
    """

    visible_only = True
    relative_bias = False  # no windowed attention at all

    def __init__(
        self,
        *args: Any,
        img_size: Any = 224,
        cost_model: CostModel = DEFAULT_COST_MODEL,
        fused_attn: bool = True,
        sparse_backend: str = "auto",
        **kwargs: Any,
    ):
        if kwargs.get("linear"):
            raise ValueError(LINEAR_SRA_HINT)
        super().__init__(*args, **kwargs)
        self._init_geometry(img_size)
        self.peg_stages = tuple(range(self.num_stages))  # every stage's MLP has a 3x3 depthwise conv
        self.sparse = get_sparse_backend(sparse_backend)
        self.cost_model = cost_model
        self.fused_attn = fused_attn
        self.last_grouping: Dict[str, float] = {}
        self._check_architecture()

    def _check_architecture(self) -> None:
        """Fail at construction, naming the fix, where visible-only computing cannot equal timm's PVTv2."""
        stem = self.patch_embed.proj
        k, s, p = stem.kernel_size[0], stem.stride[0], stem.padding[0]
        if k != 2 * p + 1 or self.unit % s:
            raise ValueError(f"the stem conv must be odd-sized with 'same' padding (timm's 7x7/stride 4/padding 3), got {stem}")
        for i, stage in enumerate(self.stages):
            t = self.tokens_per_unit(i)
            if stage.downsample is not None:
                check_conv3x3_stride2(stage.downsample.proj)
            for blk in stage.blocks:
                sr = blk.attn.sr.stride[0] if blk.attn.sr is not None else 1
                if t % sr:
                    raise ValueError(
                        f"stage {i}: sr_ratio {sr} does not divide the {t}x{t} tokens of a mask unit; "
                        f"use sr_ratios dividing (8, 4, 2, 1) stage by stage (timm's default is exactly that)"
                    )

    # -- host-side planning -----------------------------------------------------------------------
    def window_partitions(self):
        """None: PVTv2's attention is global (the planner only builds the conv neighbour indices)."""
        return iter(())

    # -- layers -----------------------------------------------------------------------------------
    def embed_visible(self, images: torch.Tensor, plan: DevicePlan) -> torch.Tensor:
        """The stem on the visible units: ``(B, N_vis * t * t, C)`` unit-major tokens, LayerNorm'd."""
        conv = self.patch_embed.proj
        windows = visible_unit_windows(images, plan.mask, plan.vis_idx, plan.grid, conv.padding[0])
        b = windows.shape[0]
        x = F.conv2d(windows.flatten(0, 1), conv.weight, conv.bias, stride=conv.stride)  # (B*N_vis, C, t, t)
        x = x.flatten(2).transpose(1, 2).reshape(b, -1, x.shape[1])
        return self.patch_embed.norm(x)

    def mlp_forward(self, mlp: nn.Module, x: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
        """timm's MlpWithDepthwiseConv with its 3x3 depthwise conv as a submanifold conv on the stage's unit tiles."""
        x = mlp.relu(mlp.fc1(x))
        x = mlp.drop(mlp.act(tiled_depthwise3x3(x, mlp.dwconv, tiles)))
        return mlp.drop(mlp.fc2(x))

    def block_forward(self, blk: nn.Module, x: torch.Tensor, geometry: VisibleGeometry, t: int, tiles: torch.Tensor) -> torch.Tensor:
        attn = blk.attn
        h = reduced_attention(attn, blk.norm1(x), self.sparse, geometry, t, self.fused_attn, self.training)
        x = x + blk.drop_path1(attn.proj_drop(h))
        return x + blk.drop_path2(self.mlp_forward(blk.mlp, blk.norm2(x), tiles))

    # -- forward ----------------------------------------------------------------------------------
    def stages_from_plan(self, images: torch.Tensor, plan: DevicePlan) -> List[torch.Tensor]:
        geometry = self.sparse_geometry(plan)
        x = self.embed_visible(images, plan)
        t = self.tokens_per_unit(0)
        outs = []
        for i, stage in enumerate(self.stages):
            if stage.downsample is not None:
                x = stage.downsample.norm(self.sparse.conv3x3_stride2(x, stage.downsample.proj, geometry, t))
                t = self.tokens_per_unit(i)
            tiles = unit_tiles(geometry.neighbours(t), t)  # shared by the stage's MLP convs
            for blk in stage.blocks:
                if stage.grad_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(self.block_forward, blk, x, geometry, t, tiles, use_reentrant=False)
                else:
                    x = self.block_forward(blk, x, geometry, t, tiles)
            outs.append(stage.norm(x))
            x = outs[-1]
        return outs

    def forward_plan(self, images: torch.Tensor, plan: DevicePlan) -> torch.Tensor:
        return self.stages_from_plan(images, plan)[-1]  # the last stage's norm is the final norm


class AllTokenPVTv2(PVTv2EncoderMixin, PyramidVisionTransformerV2):
    """The SimMIM-style baseline: timm's PVTv2 over all tokens, a mask token in place of hidden patches
    (inserted after the stem and its norm, as :class:`~greenmim.models.swin.AllTokenSwin` does).

    ``forward(images, mask, mask_token)`` -> ``(B, num_units, C)`` final features of every unit.
    Its attention runs fused (``scaled_dot_product_attention``) whatever timm's global setting.
    """

    visible_only = False

    def __init__(self, *args: Any, img_size: Any = 224, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._init_geometry(img_size)
        self.use_fused_attention()

    def forward(self, images: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor, checked: bool = False) -> torch.Tensor:
        """See :meth:`~greenmim.models.geometry.EncoderGeometryMixin.embed_with_mask_tokens` for ``mask``
        and ``checked``."""
        x = self.stages(self.embed_with_mask_tokens(images, mask, mask_token, checked))  # (B, C, H/32, W/32), last stage's norm applied
        return x.flatten(2).transpose(1, 2)


# timm's entrypoint arguments (timm/models/pvt_v2.py); the rest are the constructor's defaults
# (sr_ratios 8/4/2/1, mlp_ratios 8/8/4/4); img_size is greenmim's (timm's PVTv2 takes none)
_WIDE = (64, 128, 320, 512)
_HEADS = (1, 2, 5, 8)
PVT_V2_ARCHS = {
    "pvt_v2_b0": dict(img_size=224, depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256), num_heads=_HEADS),
    "pvt_v2_b1": dict(img_size=224, depths=(2, 2, 2, 2), embed_dims=_WIDE, num_heads=_HEADS),
    "pvt_v2_b2": dict(img_size=224, depths=(3, 4, 6, 3), embed_dims=_WIDE, num_heads=_HEADS),
    "pvt_v2_b3": dict(img_size=224, depths=(3, 4, 18, 3), embed_dims=_WIDE, num_heads=_HEADS),
    "pvt_v2_b4": dict(img_size=224, depths=(3, 8, 27, 3), embed_dims=_WIDE, num_heads=_HEADS),
    "pvt_v2_b5": dict(img_size=224, depths=(3, 6, 40, 3), embed_dims=_WIDE, num_heads=_HEADS, mlp_ratios=(4, 4, 4, 4)),
}

for _name, _args in PVT_V2_ARCHS.items():
    register_encoder(EncoderSpec(_name, "pvt_v2", _args, VisiblePVTv2, AllTokenPVTv2, timm_img_size=False))
refuse_encoder("pvt_v2_b2_li", LINEAR_SRA_HINT)
