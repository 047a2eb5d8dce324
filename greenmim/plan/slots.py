"""Group slots: where each visible token of a stage sits in the ``(num_groups, group_size)`` grid of
one windowed attention (host side; the device side is :class:`~greenmim.ops.group_attention.GroupLayout`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .grouping import DEFAULT_COST_MODEL, CostModel, solve_grouping
from .static_shapes import StaticShape, static_packing
from .windows import StageWindows


@dataclass
class GroupSlots:
    """Host-side packing of one stage's visible tokens into attention groups (CPU tensors).

    Attributes:
        num_groups, group_size: the slot grid ``(n_g, g)``.
        window: the window size ``(wh, ww)``.
        slot_token: ``(n_g * g,)`` int32, the token gathered into each slot; padding slots hold
            ``N`` (the token count), a zero row appended to the tokens. On the real slots it is the
            inverse of ``token_slot``: slot <-> token is a permutation, padding aside.
        token_slot: ``(N,)`` int32, the slot of each token.
        slot_window: ``(n_g * g,)`` int32, the window of each slot; padding slots get unique negative
            ids, so they attend only to themselves and no softmax row is empty.
        slot_pos: ``(n_g * g,)`` int32, ``y * (2ww - 1) + x`` of the slot's token on the stage grid:
            the difference of two slots' values indexes Swin's relative position table.
        tokens: visible tokens planned (for statistics).
        optimal: whether the solver proved its plan optimal.
        overflow: a static plan's batch did not fit its static shape (the shape is larger).
        broadcast: the slots index one sample's ``N`` tokens and serve every sample of the batch
            (shared masks: the attention runs on ``(B * n_g, heads, g, g)`` with one bias for all).
    """

    num_groups: int
    group_size: int
    window: Tuple[int, int]
    slot_token: torch.Tensor
    token_slot: torch.Tensor
    slot_window: torch.Tensor
    slot_pos: torch.Tensor
    tokens: int = 0
    optimal: bool = True
    overflow: bool = False
    broadcast: bool = False

    @property
    def num_slots(self) -> int:
        return self.num_groups * self.group_size

    @property
    def num_rel(self) -> int:
        """Rows of Swin's relative position table: ``(2wh - 1) * (2ww - 1)``."""
        return (2 * self.window[0] - 1) * (2 * self.window[1] - 1)

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("slot_token", "token_slot", "slot_window", "slot_pos")}


def plan_group_slots(
    windows: StageWindows,
    cost_model: CostModel = DEFAULT_COST_MODEL,
    group_multiple: int = 1,
    pad_groups_to: int = 0,
    static: Optional[StaticShape] = None,
    broadcast: bool = False,
) -> GroupSlots:
    """Solve the grouping of ``windows`` and lay its tokens out in slots (host only, O(N)).

    Args:
        windows: the stage's visible tokens and their windows.
        cost_model: the attention cost the solver minimises.
        group_multiple: only group sizes that are multiples of this (8 suits fused GPU kernels).
        pad_groups_to: if > 0, append all-padding groups up to a multiple of this count (bucketed
            shapes for CUDA graphs / ``torch.compile``); they cost attention work only.
        static: pack into this fixed shape instead (see :mod:`greenmim.plan.static_shapes`; a batch that
            overflows it gets a larger shape and ``overflow`` set); ``pad_groups_to`` is then unused.
        broadcast: ``windows`` are one sample's, and the layout serves every sample of the batch
            (shared masks).
    """
    overflow = False
    if static is None:
        plan = solve_grouping(windows.counts, windows.capacity, cost_model, group_multiple=group_multiple)
        n_g = plan.num_groups
        if pad_groups_to > 0:
            n_g = -(-n_g // pad_groups_to) * pad_groups_to
    else:
        plan, shape, overflow = static_packing(windows.counts, windows.capacity, static, cost_model, group_multiple)
        n_g = shape.num_groups
    g = plan.group_size
    n_slots = n_g * g
    tw = windows.token_window
    n_tok = tw.size
    token_slot = plan.window_group[tw] * g + plan.window_offset[tw] + windows.token_rank

    padding = np.ones(n_slots, dtype=bool)
    padding[token_slot] = False
    slot_token = np.empty(n_slots, dtype=np.int32)
    slot_token[token_slot] = np.arange(n_tok)
    slot_token[padding] = n_tok  # the zero row
    slot_window = -1 - np.arange(n_slots, dtype=np.int32)
    slot_window[token_slot] = tw
    wh, ww = windows.window
    slot_pos = np.zeros(n_slots, dtype=np.int32)
    slot_pos[token_slot] = windows.ys * (2 * ww - 1) + windows.xs
    return GroupSlots(
        num_groups=n_g,
        group_size=g,
        window=(wh, ww),
        slot_token=torch.from_numpy(slot_token),
        token_slot=torch.from_numpy(token_slot.astype(np.int32)),
        slot_window=torch.from_numpy(slot_window),
        slot_pos=torch.from_numpy(slot_pos),
        tokens=int(n_tok),
        optimal=plan.optimal,
        overflow=overflow,
        broadcast=broadcast,
    )
