"""Group window attention against a naive per-window loop (independent of the grouping)."""
import numpy as np
import pytest
import torch

from greenmim.grouping import CostModel
from greenmim.masking import random_mask
from greenmim.ops.group_attention import GroupLayout, group_window_attention, plan_group_slots
from greenmim.grouping import solve_grouping
from greenmim.ops.windows import stage_windows


def naive_window_attention(x, win, qkv, proj, heads, table):
    """Attention computed window by window in plain PyTorch."""
    out = torch.zeros(x.shape[0], proj.out_features)
    wh, ww = win.window
    for w in range(win.counts.size):
        idx = torch.from_numpy(np.nonzero(win.token_window == w)[0])
        q, k, v = qkv(x[idx]).view(len(idx), 3, heads, -1).permute(1, 2, 0, 3)
        ys, xs = torch.from_numpy(win.ys[idx.numpy()]), torch.from_numpy(win.xs[idx.numpy()])
        rel = (ys[:, None] - ys[None] + wh - 1) * (2 * ww - 1) + (xs[:, None] - xs[None] + ww - 1)
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + table[rel].permute(2, 0, 1)
        out[idx] = proj((attn.softmax(-1) @ v).transpose(0, 1).reshape(len(idx), -1))
    return out


@pytest.mark.parametrize("shift", [0, 3])
@pytest.mark.parametrize("fused", [True, False])
def test_matches_naive_per_window_attention(shift, fused):
    torch.manual_seed(0)
    mask = random_mask(3, 49, 0.5, generator=torch.Generator().manual_seed(2)).numpy()
    win = stage_windows(mask, (7, 7), tokens_per_unit=2, window=7, shift=shift)  # 14x14 stage grid
    # a slot-dominated cost model makes the solver pack several windows per group
    cost = CostModel(a=1.0, b=500.0)
    layout = GroupLayout.from_slots(plan_group_slots(win, cost), torch.device("cpu"))
    # windows of different samples share groups (per-sample masks pack tighter)
    sample_of_window = np.zeros(win.counts.size, dtype=int)
    sample_of_window[win.token_window] = np.repeat(np.arange(3), win.ys.size // 3)
    groups = solve_grouping(win.counts, win.capacity, cost).groups
    assert any(len({sample_of_window[w] for w in grp}) > 1 for grp in groups)
    heads, dim = 2, 16
    qkv, proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
    table = torch.randn(13 * 13, heads)
    x = torch.randn(win.ys.size, dim)
    got = group_window_attention(x, layout, qkv, proj, heads, table, fused=fused)
    torch.testing.assert_close(got, naive_window_attention(x, win, qkv, proj, heads, table), atol=1e-5, rtol=1e-4)
