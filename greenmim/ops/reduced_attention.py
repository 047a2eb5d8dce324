"""Global attention with spatially reduced keys on visible tokens (Twins' GSA, PVTv2's SRA).

Queries are all visible tokens of a sample; keys and values come from the kernel == stride
spatial-reduction conv (``sr``) over the visible mask units, then its LayerNorm, or from the
visible tokens themselves where there is no reduction (``sr`` is None). ``sr`` must divide the
tokens per unit side, so each reduced key lies inside one unit (see
:func:`~greenmim.ops.sparse_conv.check_stride_conv`). Every sample has the same number of visible
units, so this is one rectangular batched attention with no mask; it equals dense attention whose
hidden keys are ignored.

The attention module is timm's (``q``, ``kv``, ``sr``, ``norm``, ``proj``, ``num_heads``,
``attn_drop``); Twins' ``GlobalSubSampleAttn`` and PVTv2's ``Attention`` share these names.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, drop: float, fused: bool = True) -> torch.Tensor:
    """Softmax attention ``(B, h, N, d) x (B, h, M, d) -> (B, h, N, d)``: fused
    (``scaled_dot_product_attention``) or the plain reference path."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
    attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    return F.dropout(attn, drop) @ v if drop else attn @ v


def reduced_attention(
    attn: nn.Module, x: torch.Tensor, sparse, geometry, t: int, fused: bool = True, training: bool = False
) -> torch.Tensor:
    """``attn`` on ``(B, N, C)`` unit-major visible tokens with ``t`` tokens per unit side -> ``(B, N, C)``
    after ``attn.proj`` (``proj_drop`` is left to the caller). ``sparse``/``geometry``: the
    :mod:`greenmim.ops.sparse_conv` backend and the batch's :class:`VisibleGeometry`."""
    b, n, c = x.shape
    heads = attn.num_heads
    q = attn.q(x).view(b, n, heads, c // heads).transpose(1, 2)
    if attn.sr is not None:
        x = attn.norm(sparse.stride_conv(x, attn.sr, geometry, t))
    k, v = attn.kv(x).view(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = attend(q, k, v, attn.attn_drop.p if training else 0.0, fused)
    return attn.proj(out.transpose(1, 2).reshape(b, n, c))
