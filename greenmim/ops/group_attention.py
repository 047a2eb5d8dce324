"""Group window attention: windows of visible tokens packed into equal-size groups.

A :class:`GroupLayout` says where each visible token sits in the ``(num_groups, group_size)`` slot
grid chosen by the grouping solver, and which slot pairs may attend (same window; padding slots
attend only to themselves, so no softmax row is empty). It is built once per stage and window
partition and shared by every block of that stage.

:func:`group_window_attention` then runs one attention layer: q, k, v are projected on the
``N_vis`` tokens (never on padding), gathered into groups, attended with the relative position bias
of each pair's true coordinate difference plus ``-inf`` between windows, and scattered back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..grouping import DEFAULT_COST_MODEL, CostModel, GroupingPlan, solve_grouping
from .windows import StageWindows


@dataclass
class GroupLayout:
    """Device tensors describing one packing of visible tokens into attention groups.

    Attributes:
        num_groups, group_size: the slot grid ``(n_g, g)``.
        slot_token: ``(n_g * g,)`` long, the token gathered into each slot (padding slots repeat
            token 0; they are masked as keys and their outputs are dropped).
        token_slot: ``(N,)`` long, the slot of each token (inverse of ``slot_token``).
        rel_index: ``(n_g, g, g)`` long into the ``((2wh-1)*(2ww-1), heads)`` relative position
            table extended by one ``-inf`` row (index ``num_rel``), which marks the pairs that may
            not attend (different windows, padding).
        num_rel: ``(2wh-1)*(2ww-1)``, the size of the relative position table.
        plan: the solver's plan (for statistics).
    """

    num_groups: int
    group_size: int
    slot_token: torch.Tensor
    token_slot: torch.Tensor
    rel_index: torch.Tensor
    num_rel: int
    plan: GroupingPlan


def build_group_layout(
    windows: StageWindows,
    device: torch.device,
    cost_model: CostModel = DEFAULT_COST_MODEL,
) -> GroupLayout:
    """Solve the grouping for ``windows`` and build its device tensors.

    Host work is O(N) on small integer arrays; the O(n_g * g^2) pair tensors are built on
    ``device`` from per-slot vectors, so nothing quadratic crosses the bus.
    """
    plan = solve_grouping(windows.counts, windows.capacity, cost_model)
    g, n_g = plan.group_size, plan.num_groups
    n_slots = n_g * g
    tw = windows.token_window
    token_slot = plan.window_group[tw] * g + plan.window_offset[tw] + windows.token_rank

    slot_token = np.zeros(n_slots, dtype=np.int64)
    slot_token[token_slot] = np.arange(tw.size)
    # padding slots get unique negative window ids so they only attend to themselves
    slot_window = -1 - np.arange(n_slots, dtype=np.int64)
    slot_window[token_slot] = tw
    slot_y = np.zeros(n_slots, dtype=np.int64)
    slot_x = np.zeros(n_slots, dtype=np.int64)
    slot_y[token_slot] = windows.ys
    slot_x[token_slot] = windows.xs

    def to_dev(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if device.type == "cuda":  # pinned memory makes the copy asynchronous: no wait on the GPU
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    wh, ww = windows.window
    num_rel = (2 * wh - 1) * (2 * ww - 1)
    # the slot's relative-position "coordinate" y*(2ww-1)+x: pair index = own - other + centre
    slot_pos = slot_y * (2 * ww - 1) + slot_x
    sw, sp = (to_dev(a).view(n_g, g) for a in (slot_window, slot_pos))
    rel = sp[:, :, None] - sp[:, None, :] + ((wh - 1) * (2 * ww - 1) + ww - 1)
    rel_index = rel.masked_fill_(sw[:, :, None] != sw[:, None, :], num_rel)
    return GroupLayout(n_g, g, to_dev(slot_token), to_dev(token_slot), rel_index, num_rel, plan)


def group_attention_bias(layout: GroupLayout, table: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias: relative position bias where allowed, ``-inf`` elsewhere.

    ``table`` is Swin's ``((2wh-1)*(2ww-1), heads)`` relative position table: the result is
    ``(n_g, heads, g, g)``. With ``table=None`` (Twins: no bias) it is ``(n_g, 1, g, g)``, which
    broadcasts over heads.
    """
    if table is None:
        table = torch.zeros(layout.num_rel, 1, dtype=dtype, device=layout.rel_index.device)
    blocked = torch.full((1, table.shape[1]), float("-inf"), dtype=dtype, device=table.device)
    table = torch.cat([table.to(dtype), blocked])
    return table[layout.rel_index].permute(0, 3, 1, 2)


def group_window_attention(
    x: torch.Tensor,
    layout: GroupLayout,
    qkv: torch.nn.Linear,
    proj: torch.nn.Linear,
    num_heads: int,
    rel_pos_table: Optional[torch.Tensor] = None,
    attn_drop: float = 0.0,
    fused: bool = True,
) -> torch.Tensor:
    """Multi-head self-attention inside windows, on visible tokens only.

    Args:
        x: ``(N, C)`` visible tokens (the layout's token order).
        layout: where each token sits in the group slots.
        qkv, proj: the attention's projections (timm's ``attn.qkv`` / ``attn.proj``).
        num_heads: attention heads.
        rel_pos_table: relative position bias table or None.
        attn_drop: attention dropout probability (training only; the caller passes 0 in eval).
        fused: use ``scaled_dot_product_attention``; False runs the plain reference path.

    Returns:
        ``(N, C_out)`` attention output, projected.
    """
    n_g, g = layout.num_groups, layout.group_size
    qkv_tok = qkv(x)  # projections on visible tokens only
    head_dim = qkv_tok.shape[1] // (3 * num_heads)
    slots = qkv_tok.index_select(0, layout.slot_token)
    q, k, v = slots.view(n_g, g, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    bias = group_attention_bias(layout, rel_pos_table, q.dtype)
    if fused:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn_drop)
    else:
        attn = (q * head_dim ** -0.5) @ k.transpose(-2, -1) + bias
        attn = attn.softmax(dim=-1)
        if attn_drop:
            attn = F.dropout(attn, attn_drop)
        out = attn @ v
    out = out.transpose(1, 2).reshape(n_g * g, num_heads * head_dim)
    out = out.index_select(0, layout.token_slot)
    return proj(out)
