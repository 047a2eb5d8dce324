"""Group window attention: windows of visible tokens packed into equal-size groups.

Two halves, split where the host/device boundary is:

* :func:`~greenmim.plan.slots.plan_group_slots` (host, numpy, runs in DataLoader workers): solve the
  grouping for one stage and window partition and say where each visible token sits in the
  ``(num_groups, group_size)`` slot grid. Its result, :class:`~greenmim.plan.slots.GroupSlots`,
  holds only O(N) int vectors.
* :class:`GroupLayout` (device): the same vectors on the device plus what the attention derives
  from them there, built once per step and shared by every block of the stage. Nothing quadratic
  crosses the bus.

:func:`group_window_attention` then runs one attention layer: q, k, v are projected on the
``N_vis`` tokens (never on padding), gathered into groups, attended with the relative position bias
of each pair's true coordinate difference and windows kept apart, and gathered back.

The gather into slots and the gather back are exact inverses (:func:`tokens_to_slots`,
:func:`slots_to_tokens`): every token has one slot, padding slots read a zero row, so the backward
of each is the other gather, never an atomic accumulate.

Two attention implementations (``attention=``):

* ``"sdpa"``: ``scaled_dot_product_attention`` with an additive ``(n_g, heads, g, g)`` bias: Swin's
  relative-position bias is gathered per pair by :class:`RelativeBiasGather` (whose backward sums
  every pair's gradient into the small table in fp32 with one ``index_add_``: the only accumulate of
  the step), ``-inf`` between windows;
* ``"flex"``: FlexAttention (:mod:`torch.nn.attention.flex_attention`): the bias is read from the
  table inside the kernel by the pair's coordinate difference (``score_mod``) and windows are kept
  apart by ``mask_mod``, so no per-pair tensor is built. Its gradient for the table is the kernel's
  own (atomic adds on CUDA; torch >= 2.6). On the CPU, which has no fused FlexAttention backward,
  it runs torch's unfused reference implementation (slow; for tests and checks).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as _flex

if TYPE_CHECKING:
    from ..plan.slots import GroupSlots

ATTENTION_BACKENDS = ("sdpa", "flex")


def check_attention(attention: str) -> str:
    """``attention`` if it names an implementation, else a ValueError naming the choices."""
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {attention!r}")
    return attention


@dataclass
class GroupLayout:
    """:class:`GroupSlots` on the device, plus the pair tensors derived from it there, built once per
    step when the plan is copied (outside any compiled region) and shared by every block of the stage.

    Attributes:
        slots: the host plan (its tensors may be pinned CPU tensors).
        slot_token, token_slot: the plan's gather indices on the device.
        slot_window, slot_pos: the plan's ``(n_g * g,)`` window ids and table coordinates on the
            device (what FlexAttention's ``mask_mod`` and ``score_mod`` read).
        attention: the implementation the layout was derived for (``"sdpa"`` or ``"flex"``).
        rel_index: ``"sdpa"`` with relative bias: ``(n_g * g * g,)`` int32 into Swin's table extended by
            one ``-inf`` row (index ``num_rel``), which marks the pairs that may not attend (different
            windows, padding); None otherwise.
        rel_index_backward: ``rel_index`` with the blocked pairs spread over :data:`SPREAD_ROWS`
            scratch rows past the table. Their gradient is zero (softmax weight 0), but accumulating
            it into the single ``-inf`` row made every blocked pair (about half of all pairs) an
            atomic add on the same address: the hottest spot of the bias backward on a GPU. int32 like
            ``rel_index``, int64 on the CPU (whose ``index_add_`` is ~100x slower with int32 indices).
        window_mask: ``"sdpa"`` without relative bias (Twins): ``(n_g, 1, g, g)`` fp32 additive mask, 0
            inside a window and ``-inf`` elsewhere; None otherwise.
        flex_blocks: the block structure of :func:`flex_block_mask` (every block of the ``g x g``
            group checked by ``mask_mod``; shared by all layouts of one group size).
    """

    slots: GroupSlots
    slot_token: torch.Tensor
    token_slot: torch.Tensor
    slot_window: Optional[torch.Tensor] = None
    slot_pos: Optional[torch.Tensor] = None
    attention: str = "sdpa"
    rel_index: Optional[torch.Tensor] = None
    rel_index_backward: Optional[torch.Tensor] = None
    window_mask: Optional[torch.Tensor] = None
    flex_blocks: Optional[Tuple[torch.Tensor, ...]] = None

    @classmethod
    def from_slots(
        cls, slots: GroupSlots, device: torch.device, relative_bias: bool = True, attention: str = "sdpa"
    ) -> "GroupLayout":
        """Copy the slot vectors to ``device`` (asynchronous from pinned memory) and derive there what
        ``attention`` needs: for ``"sdpa"`` the pair tensors (Swin's relative-position indices with
        ``relative_bias``, else Twins' window mask), for ``"flex"`` nothing per pair."""
        dev = {k: v.to(device, non_blocking=True) for k, v in slots.tensors().items()}
        layout = cls(slots, dev["slot_token"], dev["token_slot"], dev["slot_window"], dev["slot_pos"], check_attention(attention))
        n_g, g = slots.num_groups, slots.group_size
        layout.flex_blocks = _flex_blocks(g, layout.slot_window.device)  # cached: costs nothing
        if attention == "flex":
            return layout
        sw = dev["slot_window"].view(n_g, g)
        same_window = sw[:, :, None] == sw[:, None, :]
        if relative_bias:  # a handful of kernels per layout: this runs on the training thread
            sp = dev["slot_pos"].view(n_g, g)
            rel = (sp[:, :, None] - sp[:, None, :]).add_(_center_row(slots.window))
            same = same_window.view(-1)
            layout.rel_index = torch.where(same, rel.view(-1), slots.num_rel)
            backward = torch.where(same, layout.rel_index, _spread_rows(same.numel(), sw.device, slots.num_rel))
            # the CPU's index_add_ runs a per-index slow path (~100x slower) on int32 indices
            layout.rel_index_backward = backward.long() if backward.device.type == "cpu" else backward
        else:
            blocked = torch.zeros(same_window.shape, dtype=torch.float32, device=sw.device)
            layout.window_mask = blocked.masked_fill_(~same_window, float("-inf")).unsqueeze(1)
        return layout

    @property
    def num_groups(self) -> int:
        return self.slots.num_groups

    @property
    def group_size(self) -> int:
        return self.slots.group_size

    @property
    def num_rel(self) -> int:
        return self.slots.num_rel


def _center_row(window: Tuple[int, int]) -> int:
    """The row of Swin's ``(2wh - 1) * (2ww - 1)`` table for a zero coordinate difference: a pair's
    row is its ``slot_pos`` difference plus this."""
    wh, ww = window
    return (wh - 1) * (2 * ww - 1) + ww - 1


SPREAD_ROWS = 1024  # scratch rows that absorb the (zero) gradients of blocked pairs
_SPREAD: Dict[Tuple[torch.device, int], torch.Tensor] = {}


def _spread_rows(n: int, device: torch.device, first_row: int) -> torch.Tensor:
    """``first_row + arange(n) % SPREAD_ROWS`` (int32), sliced from a cached tensor grown by doubling,
    so a step launches nothing for it."""
    key = (torch.device(device), first_row)
    cached = _SPREAD.get(key)
    if cached is None or cached.numel() < n:
        size = max(n, 2 * (cached.numel() if cached is not None else 0), SPREAD_ROWS)
        cached = _SPREAD[key] = (torch.arange(size, device=device, dtype=torch.int32) % SPREAD_ROWS).add_(first_row)
    return cached[:n]


class RelativeBiasGather(torch.autograd.Function):
    """``table[:, index]`` for a ``(heads, rows)`` table, with an fp32 segment-sum backward.

    Thousands of pairs share each of the table's ~170 rows. The default backward of an index is a
    sort-based accumulate in the gradient's dtype (bf16 under autocast); this one adds the pair
    gradients into an fp32 ``(heads, rows + SPREAD_ROWS)`` buffer with ``index_add_`` following
    ``backward_index`` (``index`` with the pairs whose gradient is known to be zero moved to
    scratch rows) and casts once at the end. Under deterministic algorithms
    (``torch.use_deterministic_algorithms``) it uses the deterministic ``index_put_`` accumulate,
    still in fp32.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor, backward_index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(backward_index)
        ctx.rows, ctx.table_dtype = table.shape[1], table.dtype
        return table.index_select(1, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        acc = torch.zeros(grad.shape[0], ctx.rows + SPREAD_ROWS, dtype=torch.float32, device=grad.device)
        if torch.are_deterministic_algorithms_enabled():
            acc.index_put_((slice(None), index), grad.float(), accumulate=True)
        else:
            acc.index_add_(1, index, grad.float())
        return acc[:, : ctx.rows].to(ctx.table_dtype), None, None


def relative_position_bias(layout: GroupLayout, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(n_g, heads, g, g)`` additive bias: Swin's relative position bias of each slot pair's true
    coordinate difference, ``-inf`` between windows and padding. ``table``: ``(num_rel, heads)``."""
    blocked = table.new_full((1, table.shape[1]), float("-inf"))
    extended = torch.cat([table, blocked]).t()  # (heads, num_rel + 1), fp32 like the parameter
    bias = RelativeBiasGather.apply(extended, layout.rel_index, layout.rel_index_backward)
    n_g, g = layout.num_groups, layout.group_size
    return bias.view(-1, n_g, g, g).transpose(0, 1).to(dtype)


class _InverseGathers(torch.autograd.Function):
    """``rows(x, index)`` along dim 1 whose backward is ``rows(grad, inverse)``: exact when ``index``
    and ``inverse`` are inverse permutations on the real rows and the rows ``index`` does not reach
    get a zero gradient (padding), which ``rows`` gives by reading the zero row ``N``. ``zero_row``:
    ``index`` (else ``inverse``) holds ``N`` (only that direction pays for the zero row)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, zero_row: bool) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.zero_row = zero_row
        return _rows(x, index, zero_row)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return _rows(grad, inverse, not ctx.zero_row), None, None, None


def _rows(x: torch.Tensor, index: torch.Tensor, zero_row: bool) -> torch.Tensor:
    """``x[:, index]`` for ``x`` ``(S, N, C)``; with ``zero_row`` index ``N`` reads a zero row."""
    return (F.pad(x, (0, 0, 0, 1)) if zero_row else x).index_select(1, index)


def tokens_to_slots(x: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """``(S, N, C)`` tokens -> ``(S, n_g * g, C)`` slots (zeros in padding slots). Its backward is the
    gather back (:func:`slots_to_tokens` of the gradient), not an accumulate."""
    return _InverseGathers.apply(x, layout.slot_token, layout.token_slot, True)


def slots_to_tokens(x: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """``(S, n_g * g, C)`` slots -> ``(S, N, C)`` tokens, padding slots dropped. Its backward is the
    gather into slots (zero gradient in padding slots), not an accumulate."""
    return _InverseGathers.apply(x, layout.token_slot, layout.slot_token, False)


FLEX_BLOCK_SIZE = 128  # FlexAttention's default tile: a group of g <= 128 slots is one block
_FLEX_BLOCKS: Dict[Tuple[torch.device, int], Tuple[torch.Tensor, ...]] = {}


def _flex_blocks(group_size: int, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """``(kv_num_blocks, kv_indices, q_num_blocks, q_indices)`` of a ``g x g`` attention in which
    every block is partial (checked by ``mask_mod``), batch and heads broadcast; cached per ``g``."""
    key = (torch.device(device), group_size)
    if key not in _FLEX_BLOCKS:
        n = -(-group_size // FLEX_BLOCK_SIZE)
        num = torch.full((1, 1, n), n, dtype=torch.int32, device=device)
        idx = torch.arange(n, dtype=torch.int32, device=device).expand(1, 1, n, n).contiguous()
        _FLEX_BLOCKS[key] = (num, idx, num, idx)  # all blocks present: the transpose is the same
    return _FLEX_BLOCKS[key]


def flex_block_mask(layout: GroupLayout, mask_mod: Callable) -> "_flex.BlockMask":
    """The layout's block mask for ``mask_mod`` (which keeps the windows of a group apart)."""
    g = layout.group_size
    kv_num, kv_idx, q_num, q_idx = layout.flex_blocks
    return _flex.BlockMask(
        (g, g), kv_num, kv_idx, None, None, q_num, q_idx, None, None, (FLEX_BLOCK_SIZE, FLEX_BLOCK_SIZE), mask_mod
    )


def _allow_cpu_flex_backward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    if query.device.type != "cpu":
        _TORCH_FLEX_VALIDATE_DEVICE(query, key, value)


_TORCH_FLEX_VALIDATE_DEVICE = _flex._validate_device


@contextlib.contextmanager
def _cpu_flex_backward():
    """Let FlexAttention take CPU inputs that require grad. torch refuses them up front (it has no
    fused CPU backward), but its unfused implementation, which the CPU then runs, is device-agnostic
    and differentiates ``score_mod`` and its captured tensors like the fused CUDA kernels do."""
    _flex._validate_device = _allow_cpu_flex_backward
    try:
        yield
    finally:
        _flex._validate_device = _TORCH_FLEX_VALIDATE_DEVICE


_COMPILED_FLEX: Dict[str, Callable] = {}


def _flex_kernel(device: torch.device) -> Callable:
    """``flex_attention``, wrapped in ``torch.compile`` on CUDA when the caller runs eagerly: called
    eagerly it is the unfused reference (scores materialised), which is what the CPU runs."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return _flex.flex_attention
    if "cuda" not in _COMPILED_FLEX:  # static shapes: one graph per layout shape (static plans: a few)
        _COMPILED_FLEX["cuda"] = torch.compile(_flex.flex_attention, dynamic=False)
    return _COMPILED_FLEX["cuda"]


def flex_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: GroupLayout,
    table: Optional[torch.Tensor],
    samples: int,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """FlexAttention over the groups: ``q, k, v`` ``(samples * n_g, heads, g, head_dim)`` ->
    the same shape. Two slots attend iff their window ids are equal (``mask_mod``); with Swin's
    ``table`` ``(num_rel, heads)`` the score of a pair gains ``table[dy * (2ww - 1) + dx + center, h]``
    (``score_mod``), read in the kernel. With broadcast layouts (``samples > 1``) batch ``b`` is group
    ``b % n_g`` of sample ``b // n_g``. ``scale``: the logits' factor (default ``head_dim ** -0.5``)."""
    n_g, g = layout.num_groups, layout.group_size
    window = layout.slot_window  # (n_g * g,): flat indices vectorise best in the unfused CPU path

    def slot(b: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return (b % n_g if samples > 1 else b) * g + idx

    def same_window(b, h, q_idx, kv_idx):
        return window[slot(b, q_idx)] == window[slot(b, kv_idx)]

    score_mod = None
    if table is not None:
        pos = layout.slot_pos
        center, last = _center_row(layout.slots.window), layout.num_rel - 1

        def relative_bias(score, b, h, q_idx, kv_idx):
            # pairs of different windows fall outside the table: clamped, then masked by mask_mod
            row = (pos[slot(b, q_idx)] - pos[slot(b, kv_idx)] + center).clamp(0, last)
            return score + table[row, h]

        score_mod = relative_bias
    block_mask = flex_block_mask(layout, same_window)
    with _cpu_flex_backward() if q.device.type == "cpu" else contextlib.nullcontext():
        return _flex_kernel(q.device)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


def group_window_attention(
    x: torch.Tensor,
    layout: GroupLayout,
    qkv: Callable[[torch.Tensor], torch.Tensor],
    proj: torch.nn.Linear,
    num_heads: int,
    rel_pos_table: Optional[torch.Tensor] = None,
    attn_drop: float = 0.0,
    fused: bool = True,
    attention: str = "sdpa",
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Multi-head self-attention inside windows, on visible tokens only.

    Args:
        x: ``(N, C)`` visible tokens (the layout's token order); with a broadcast layout (shared
            masks) ``(B * N, C)``, sample-major, every sample laid out by the same slots.
        layout: where each token sits in the group slots.
        qkv, proj: the attention's projections (timm's ``attn.qkv`` / ``attn.proj``); ``qkv`` may be
            any per-token map ``(N, C) -> (N, 3C)`` (Swin V2: projection plus cosine normalisation).
        num_heads: attention heads.
        rel_pos_table: Swin's ``(num_rel, heads)`` relative position bias table (a parameter, or
            Swin V2's table computed by its CPB MLP), or None (Twins).
        attn_drop: attention dropout probability (training only; the caller passes 0 in eval).
        fused: ``"sdpa"`` only: use ``scaled_dot_product_attention``; False runs the plain reference path.
        attention: ``"sdpa"`` (a per-pair bias tensor) or ``"flex"`` (FlexAttention: the bias read
            from the table in the kernel; no attention dropout). See the module docstring.
        scale: the logits' factor (default ``head_dim ** -0.5``; Swin V2 scales its q itself: 1.0).

    Returns:
        ``(N, C_out)`` attention output, projected.
    """
    n_g, g = layout.num_groups, layout.group_size
    samples = x.shape[0] // layout.token_slot.shape[0] if layout.slots.broadcast else 1
    qkv_tok = qkv(x)  # projections on visible tokens only
    qkv_tok = qkv_tok.view(samples, -1, qkv_tok.shape[-1])
    head_dim = qkv_tok.shape[-1] // (3 * num_heads)
    slots = tokens_to_slots(qkv_tok, layout)
    q, k, v = slots.view(samples * n_g, g, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if attention == "flex":
        if attn_drop:
            raise ValueError("attention='flex' has no attention dropout: set attn_drop_rate=0 or use attention='sdpa'")
        out = flex_window_attention(q, k, v, layout, rel_pos_table, samples, scale)
    else:
        out = sdpa_window_attention(q, k, v, layout, rel_pos_table, samples, attn_drop, fused, scale)
    out = out.transpose(1, 2).reshape(samples, n_g * g, num_heads * head_dim)
    return proj(slots_to_tokens(out, layout).view(x.shape[0], -1))


def sdpa_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: GroupLayout,
    table: Optional[torch.Tensor],
    samples: int,
    attn_drop: float = 0.0,
    fused: bool = True,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention over the groups with an additive per-pair bias: ``q, k, v`` ``(samples * n_g, heads,
    g, head_dim)`` -> the same shape. ``table``: Swin's ``(num_rel, heads)`` or None (window mask);
    ``scale``: the logits' factor (default ``head_dim ** -0.5``)."""
    n_g, g = layout.num_groups, layout.group_size
    if layout.attention != "sdpa":
        raise ValueError(f"this plan was derived for attention='{layout.attention}': plan it with the encoder's planner()")
    if table is None:
        bias = layout.window_mask.to(q.dtype)
    else:
        bias = relative_position_bias(layout, table, q.dtype)
    if samples > 1:  # one sample's bias, gathered once, copied over the batch (backward: a sum)
        bias = bias.unsqueeze(0).expand(samples, -1, -1, -1, -1).reshape(samples * n_g, -1, g, g)
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn_drop, scale=scale)
    attn = (q * (q.shape[-1] ** -0.5 if scale is None else scale)) @ k.transpose(-2, -1) + bias
    attn = attn.softmax(dim=-1)
    if attn_drop:
        attn = F.dropout(attn, attn_drop)
    return attn @ v
