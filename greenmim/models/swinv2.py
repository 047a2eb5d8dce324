"""Swin V2 encoders: visible-only (greenmim) and all-token (simmim baseline).

Both subclass timm's :class:`~timm.models.swin_transformer_v2.SwinTransformerV2`, so their
parameters have timm's names and layouts and load into ``timm.create_model("swinv2_...")``
unchanged. The visible-only forward is Swin V1's (:class:`~greenmim.models.swin.VisibleSwinMixin`:
unit-major tokens, group window attention, patch merging as a reshape) with V2's block:

* cosine attention: q and k are L2-normalised per head and q is multiplied by the head's learned
  logit scale (``exp(min(logit_scale, log 100))``, timm's clamp) on the visible tokens, before they
  are gathered into groups; the attention then runs with scale 1;
* the continuous position bias: each block evaluates its CPB MLP once on its coordinate table
  (timm's ``relative_coords_table``, ``(2wh-1)(2ww-1)`` rows), takes ``16 * sigmoid``, and the
  group attention gathers that table per token pair by the true coordinate difference, exactly as
  Swin V1's learned table;
* the residual post-norm: ``x + norm1(attn(x))``, ``x + norm2(mlp(x))``;
* V2's patch merging: reduction, then norm.

The coordinate table is timm's: for a window ``w`` (clamped to the stage grid as timm clamps it) the
coordinates are divided by ``pretrained_window_size - 1`` when ``pretrained_window_sizes`` is set,
else by ``w - 1``, then log-spaced. At mask ratio 0 the output equals timm's ``forward_features``; at
ratio > 0 it equals a dense Swin V2 whose attention ignores masked keys.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.swin_transformer_v2 import SwinTransformerV2, WindowAttention

from ..ops.group_attention import GroupLayout, group_window_attention
from .registry import EncoderSpec, register_encoder
from .swin import AllTokenSwinMixin, VisibleSwinMixin

LOGIT_SCALE_MAX = math.log(1.0 / 0.01)  # timm's (and the paper's) clamp of the learned logit scale
CPB_RANGE = 16.0  # timm's 16 * sigmoid(cpb_mlp(...))


def cosine_qkv(attn: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Swin V2's q, k, v of tokens ``(..., C) -> (..., 3C)`` (timm's ``[q | k | v]`` channel layout,
    heads inside each): q and k L2-normalised per head, q times the head's clamped logit scale,
    so that ``q @ k^T`` is timm's scaled cosine similarity."""
    bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    qkv = F.linear(x, attn.qkv.weight, bias)
    q, k, v = qkv.unflatten(-1, (3, attn.num_heads, -1)).unbind(-3)
    scale = torch.clamp(attn.logit_scale, max=LOGIT_SCALE_MAX).exp().view(attn.num_heads, 1)
    q = F.normalize(q, dim=-1) * scale.to(q.dtype)
    k = F.normalize(k, dim=-1)
    return torch.stack((q, k, v), dim=-3).flatten(-3)


def cpb_table(attn: WindowAttention) -> torch.Tensor:
    """The block's continuous position bias table ``(num_rel, heads)``: ``16 * sigmoid`` of its CPB
    MLP on timm's coordinate table, rows in timm's ``relative_position_index`` order (Swin V1's)."""
    return CPB_RANGE * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads))


class FusedWindowAttentionV2(WindowAttention):
    """timm's Swin V2 window attention with ``scaled_dot_product_attention`` (same parameters and
    results up to float rounding): the all-token baseline's attention. timm's own runs bmm + softmax,
    a weaker baseline than the visible-only encoder's fused kernel."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b_, n, c = x.shape
        q, k, v = cosine_qkv(self, x).view(b_, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        index = self.relative_position_index.view(-1)
        bias = cpb_table(self)[index].view(n, n, -1).permute(2, 0, 1)  # (heads, n, n)
        if mask is not None:  # timm's shifted-window mask (num_windows, n, n): one batch dim per window
            windows = mask.shape[0]
            q, k, v = (t.view(-1, windows, *t.shape[1:]) for t in (q, k, v))
            bias = bias.unsqueeze(0) + mask.unsqueeze(1)
        drop = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=drop, scale=1.0)
        out = out.reshape(b_, self.num_heads, n, -1).transpose(1, 2).reshape(b_, n, c)
        return self.proj_drop(self.proj(out))


class VisibleSwinV2(VisibleSwinMixin, SwinTransformerV2):
    """Swin V2 encoder that computes on visible mask units only.

    ``forward(images, mask)``: images ``(B, 3, H, W)``, mask ``(B, num_units)`` bool (True = masked,
    equal visible count per sample) -> ``(B, N_vis, C)`` final-stage features of the visible units
    in ascending raster order, final norm applied; or ``forward(images, plan=plan)``.
    """

    merge_norm_first = False  # V2's PatchMerging: reduction, then norm

    def block_forward(self, block: nn.Module, x: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
        b, n, c = x.shape
        attn = block.attn
        h = group_window_attention(
            x.reshape(b * n, c),
            layout,
            lambda t: cosine_qkv(attn, t),
            attn.proj,
            attn.num_heads,
            cpb_table(attn),
            attn_drop=attn.attn_drop.p if self.training else 0.0,
            fused=self.fused_attn,
            attention=self.attention,
            scale=1.0,
        )
        x = x + block.drop_path1(block.norm1(attn.proj_drop(h).view(b, n, -1)))  # residual post-norm
        return x + block.drop_path2(block.norm2(block.mlp(x)))


class AllTokenSwinV2(AllTokenSwinMixin, SwinTransformerV2):
    """The all-token Swin V2 baseline (see :class:`~greenmim.models.swin.AllTokenSwinMixin`); its
    window attentions run :class:`FusedWindowAttentionV2`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        for module in self.modules():
            if type(module) is WindowAttention:
                module.__class__ = FusedWindowAttentionV2


# timm's entrypoint arguments (timm/models/swin_transformer_v2.py) and default image sizes
_T = dict(patch_size=4, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_S = dict(_T, depths=(2, 2, 18, 2))
_B = dict(patch_size=4, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_L = dict(patch_size=4, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
_FT = dict(pretrained_window_sizes=(12, 12, 12, 6))  # the 12to16 / 12to24 fine-tuning layouts
SWINV2_ARCHS = {
    "swinv2_tiny_window8_256": dict(_T, img_size=256, window_size=8),
    "swinv2_tiny_window16_256": dict(_T, img_size=256, window_size=16),
    "swinv2_small_window8_256": dict(_S, img_size=256, window_size=8),
    "swinv2_small_window16_256": dict(_S, img_size=256, window_size=16),
    "swinv2_base_window8_256": dict(_B, img_size=256, window_size=8),
    "swinv2_base_window16_256": dict(_B, img_size=256, window_size=16),
    "swinv2_base_window12_192": dict(_B, img_size=192, window_size=12),
    "swinv2_base_window12to16_192to256": dict(_B, **_FT, img_size=256, window_size=16),
    "swinv2_base_window12to24_192to384": dict(_B, **_FT, img_size=384, window_size=24),
    "swinv2_large_window12_192": dict(_L, img_size=192, window_size=12),
    "swinv2_large_window12to16_192to256": dict(_L, **_FT, img_size=256, window_size=16),
    "swinv2_large_window12to24_192to384": dict(_L, **_FT, img_size=384, window_size=24),
}

for _name, _args in SWINV2_ARCHS.items():
    register_encoder(EncoderSpec(_name, "swinv2", _args, VisibleSwinV2, AllTokenSwinV2))
