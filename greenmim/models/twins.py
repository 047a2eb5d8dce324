"""Twins encoders: visible-only (greenmim) and all-token (simmim baseline).

Both subclass timm's :class:`~timm.models.twins.Twins`, so their parameters have timm's names and
layouts and ``load_state_dict(timm_model.state_dict(), strict=False)`` leaves only the classifier
head over.

:class:`VisibleTwins` runs on the visible mask units only, with tokens kept unit-major (see
:mod:`greenmim.plan.windows`; ``t = 8, 4, 2, 1`` tokens per unit side at 224 px):

* patch embeddings (4x4 on pixels, then 2x2 between stages) as kernel == stride sparse convs;
* locally-grouped attention (LSA) through group window attention, no relative bias;
* global sub-sampled attention (GSA): queries are all visible tokens of a sample; keys and values
  come from the sparse spatial-reduction conv (kernel = stride = sr) over the visible units and its
  LayerNorm. Every sample has the same number of visible units, so this is one rectangular batched
  attention with no mask;
* the positional encoding generator (PEG, after the first block of each stage as in timm): a 3x3
  depthwise submanifold conv plus its residual.

Convolutions go through a :mod:`greenmim.ops.sparse_conv` backend (``sparse_backend``). At mask
ratio 0 the output equals timm's ``forward_features``; at ratio > 0 it equals a dense Twins whose
attention ignores masked keys and whose convolutions see zeros at masked positions.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn as nn
from timm.models.twins import GlobalSubSampleAttn, LocallyGroupedAttn, Twins
from torch.utils.checkpoint import checkpoint

from ..plan.grouping import DEFAULT_COST_MODEL, CostModel
from ..plan.masking import check_mask, to_pair
from ..ops.group_attention import GroupLayout, check_attention, group_window_attention
from ..ops.reduced_attention import reduced_attention
from ..plan.geometry import VisibleGeometry
from ..ops.sparse_conv import get_sparse_backend
from ..plan.planner import DevicePlan, WindowPartition
from .geometry import EncoderGeometryMixin, VisibleEncoderMixin, visible_unit_pixels
from .registry import EncoderSpec, register_encoder


class TwinsEncoderMixin(EncoderGeometryMixin):
    """Maps timm Twins' attributes onto the names the pretraining model and geometry checks use,
    and adds block-level activation checkpointing."""

    def _init_geometry(self) -> None:
        self.patch_stride = self.patch_embeds[0].patch_size[0]
        self.num_stages = len(self.depths)

    @property
    def patch_embed(self) -> nn.Module:
        """The first patch embedding (``img_size``, ``patch_size``), like Swin's ``patch_embed``."""
        return self.patch_embeds[0]

    @property
    def embed_dim(self) -> int:
        """Width of the first stage (the simmim mask token's width)."""
        return self.embed_dims[0]

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block (timm's Twins has none; the trainer asks for it)."""
        self.grad_checkpointing = enable

    def run_block(self, fn, *args):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


class VisibleTwins(VisibleEncoderMixin, TwinsEncoderMixin, Twins):
    """Twins encoder that computes on visible mask units only.

    ``forward(images, mask)``: images ``(B, 3, H, W)``, mask ``(B, num_units)`` bool (True = masked,
    equal visible count per sample) -> ``(B, N_vis, C)`` final-stage features of the visible units
    in ascending raster order, final norm applied.

    Args (besides timm's Twins arguments):
        cost_model: the grouping solver's attention cost model (LSA).
        fused_attn: use ``scaled_dot_product_attention``; False runs the plain reference path.
        sparse_backend: ``'auto'`` | ``'spconv'`` | ``'native'`` (see :mod:`greenmim.ops.sparse_conv`).
        attention: the locally-grouped attention's implementation, ``'sdpa'`` or ``'flex'`` (see
            :mod:`greenmim.ops.group_attention`); the global sub-sampled attention is always SDPA.
    """

    visible_only = True
    relative_bias = False  # LSA has no relative position bias

    def __init__(
        self,
        *args: Any,
        cost_model: CostModel = DEFAULT_COST_MODEL,
        fused_attn: bool = True,
        sparse_backend: str = "auto",
        attention: str = "sdpa",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self._init_geometry()
        self.peg_stages = tuple(range(self.num_stages))  # a PEG after the first block of every stage
        self.sparse = get_sparse_backend(sparse_backend)
        self.cost_model = cost_model
        self.fused_attn = fused_attn
        self.attention = check_attention(attention)
        self.last_grouping: Dict[str, float] = {}
        self._check_architecture()

    def _check_architecture(self) -> None:
        """Fail at construction, naming the fix, where visible-only computing cannot equal timm's Twins."""
        img_h, img_w = to_pair(self.patch_embed.img_size)
        for i, blocks in enumerate(self.blocks):
            t = self.tokens_per_unit(i)
            size = (img_h // (self.patch_stride * 2 ** i), img_w // (self.patch_stride * 2 ** i))
            for blk in blocks:
                attn = blk.attn
                if isinstance(attn, LocallyGroupedAttn):
                    if size[0] % attn.ws or size[1] % attn.ws:
                        # timm zero-pads the grid and lets the padding act as keys; that cannot be visible-only
                        raise ValueError(
                            f"stage {i} grid {size[0]}x{size[1]} is not a multiple of its LSA window {attn.ws}: "
                            f"choose wss dividing every stage grid (7 at 224 px) or an img_size multiple of "
                            f"{self.patch_stride * 2 ** i * attn.ws}"
                        )
                elif isinstance(attn, GlobalSubSampleAttn):
                    if attn.sr is not None and t % attn.sr_ratio:
                        raise ValueError(
                            f"stage {i}: sr_ratio {attn.sr_ratio} does not divide the {t}x{t} tokens of a mask unit; "
                            f"use sr_ratios dividing (8, 4, 2, 1) stage by stage (timm's default is exactly that)"
                        )
                else:
                    raise TypeError(f"unsupported Twins attention {type(attn).__name__} in stage {i}")
            if self.pos_block[i].stride != 1:
                raise ValueError("only stride-1 PEGs (timm's default) are supported")

    # -- host-side planning -----------------------------------------------------------------------
    def window_partitions(self):
        """Locally-grouped attentions (LSA): one partition per stage and window size, never shifted."""
        for i, blocks in enumerate(self.blocks):
            for blk in blocks:
                if isinstance(blk.attn, LocallyGroupedAttn):
                    ws = (blk.attn.ws, blk.attn.ws)
                    yield WindowPartition(i, blk.attn.ws, ws, (0, 0))

    # -- layers -----------------------------------------------------------------------------------
    def gsa_forward(self, attn: GlobalSubSampleAttn, x: torch.Tensor, geometry: VisibleGeometry, t: int) -> torch.Tensor:
        """GSA on ``(B, N, C)`` unit-major visible tokens; keys/values from the visible units only."""
        return reduced_attention(attn, x, self.sparse, geometry, t, self.fused_attn, self.training)

    def block_forward(
        self, blk: nn.Module, x: torch.Tensor, geometry: VisibleGeometry, t: int, layouts: Dict[int, GroupLayout]
    ) -> torch.Tensor:
        b, n, c = x.shape
        attn = blk.attn
        h = blk.norm1(x)
        if isinstance(attn, LocallyGroupedAttn):
            h = group_window_attention(
                h.reshape(b * n, c),
                layouts[attn.ws],
                attn.qkv,
                attn.proj,
                attn.num_heads,
                None,  # Twins has no relative position bias
                attn_drop=attn.attn_drop.p if self.training else 0.0,
                fused=self.fused_attn,
                attention=self.attention,
            ).view(b, n, c)
        else:
            h = self.gsa_forward(attn, h, geometry, t)
        x = x + blk.drop_path1(attn.proj_drop(h))
        return x + blk.drop_path2(blk.mlp(blk.norm2(x)))

    def peg_forward(self, pos_blk: nn.Module, x: torch.Tensor, geometry: VisibleGeometry, t: int) -> torch.Tensor:
        """timm's PosConv (stride 1): 3x3 depthwise conv plus the residual, as a submanifold conv."""
        return self.sparse.depthwise3x3(x, pos_blk.proj[0], geometry, t) + x

    # -- forward ----------------------------------------------------------------------------------
    def stages_from_plan(self, images: torch.Tensor, plan: DevicePlan) -> List[torch.Tensor]:
        geometry, layouts, grid, vis_idx = self.sparse_geometry(plan), plan.layouts, plan.grid, plan.vis_idx
        b = images.shape[0]
        units = visible_unit_pixels(images, vis_idx, grid)
        x = units.permute(0, 1, 3, 4, 2).reshape(b, -1, units.shape[2])  # pixels as unit-major tokens
        t = self.unit
        outs = []
        for i, (embed, drop, blocks, pos_blk) in enumerate(zip(self.patch_embeds, self.pos_drops, self.blocks, self.pos_block)):
            x = drop(embed.norm(self.sparse.stride_conv(x, embed.proj, geometry, t)))
            t = self.tokens_per_unit(i)
            for j, blk in enumerate(blocks):
                x = self.run_block(self.block_forward, blk, x, geometry, t, layouts[i])
                if j == 0:
                    x = self.peg_forward(pos_blk, x, geometry, t)
            outs.append(x)
        return outs


class AllTokenTwins(TwinsEncoderMixin, Twins):
    """The SimMIM-style baseline: timm's Twins over all tokens, a mask token in place of hidden patches
    (inserted after the first patch embedding, as :class:`~greenmim.models.swin.AllTokenSwin` does).

    ``forward(images, mask, mask_token)`` -> ``(B, num_units, C)`` final features of every unit.
    Its attention runs fused (``scaled_dot_product_attention``) whatever timm's global setting.
    """

    visible_only = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._init_geometry()
        self.use_fused_attention()

    def forward(self, images: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor, checked: bool = False) -> torch.Tensor:
        grid = self.check_images(images)
        # checked where it lives (a device mask is not read back), unless already checked where it was planned
        if mask.device.type == "cpu" and not checked:
            mask = check_mask(mask, images.shape[0], grid.num_units)
        mask = mask.to(images.device, non_blocking=True)
        b = images.shape[0]
        x = images
        last = len(self.blocks) - 1
        # timm's forward_features, plus the mask token after the first embedding
        for i, (embed, drop, blocks, pos_blk) in enumerate(zip(self.patch_embeds, self.pos_drops, self.blocks, self.pos_block)):
            x, size = embed(x)
            if i == 0:
                t = self.tokens_per_unit(0)
                token_mask = mask.view(b, grid.height, 1, grid.width, 1).expand(-1, -1, t, -1, t).reshape(b, -1, 1)
                x = torch.where(token_mask, mask_token.to(x.dtype).view(1, 1, -1), x)
            x = drop(x)
            for j, blk in enumerate(blocks):
                x = self.run_block(blk, x, size)
                if j == 0:
                    x = pos_blk(x, size)
            if i < last:
                x = x.reshape(b, *size, -1).permute(0, 3, 1, 2).contiguous()
        return self.norm(x).reshape(b, grid.num_units, -1)


# timm's entrypoint arguments (timm/models/twins.py), at 224 px
_PCPVT = dict(
    patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1)
)
_SVT = dict(patch_size=4, mlp_ratios=(4, 4, 4, 4), wss=(7, 7, 7, 7), sr_ratios=(8, 4, 2, 1))
TWINS_ARCHS = {
    "twins_pcpvt_small": dict(_PCPVT, img_size=224, depths=(3, 4, 6, 3)),
    "twins_pcpvt_base": dict(_PCPVT, img_size=224, depths=(3, 4, 18, 3)),
    "twins_pcpvt_large": dict(_PCPVT, img_size=224, depths=(3, 8, 27, 3)),
    "twins_svt_small": dict(_SVT, img_size=224, embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), depths=(2, 2, 10, 4)),
    "twins_svt_base": dict(_SVT, img_size=224, embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), depths=(2, 2, 18, 2)),
    "twins_svt_large": dict(_SVT, img_size=224, embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), depths=(2, 2, 18, 2)),
}

for _name, _args in TWINS_ARCHS.items():
    register_encoder(EncoderSpec(_name, "twins", _args, VisibleTwins, AllTokenTwins))
