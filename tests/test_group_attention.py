"""Group window attention against a naive per-window loop (independent of the grouping)."""
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_model
from greenmim.plan.grouping import CostModel
from greenmim.plan.masking import random_mask, unit_grid
from greenmim.ops.group_attention import SPREAD_ROWS, GroupLayout, group_window_attention
from greenmim.plan.slots import plan_group_slots
from greenmim.plan.grouping import solve_grouping
from greenmim.plan.windows import stage_windows


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


# -- the backward accumulates only into the relative-position tables --------------------------------
ACCUMULATING = {"index_add", "index_add_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_",
                "index_reduce", "index_reduce_", "embedding_dense_backward", "_embedding_bag_backward"}
INDEX_PUT = {"index_put", "index_put_", "_index_put_impl", "_index_put_impl_", "_unsafe_index_put"}


class AccumulateRecorder(TorchDispatchMode):
    """Records every aten op that sums values into its output at indices (an atomic add on a GPU):
    ``(op name, shape of the tensor accumulated into)``. On the CPU the autograd engine runs the
    same backward ops a GPU would, so the census is the GPU's."""

    def __init__(self):
        super().__init__()
        self.ops, self.accumulates = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops += 1
        if name in ACCUMULATING or (name in INDEX_PUT and (kwargs.get("accumulate") or (len(args) > 3 and args[3] is True))):
            self.accumulates.append((name, tuple(args[0].shape)))
        return func(*args, **kwargs)


@pytest.mark.parametrize("kind,shared", [("swin", False), ("swin", True), ("twins", False)])
def test_backward_accumulates_only_into_relative_bias_tables(kind, shared):
    """The slot gather and the gather back are inverses (their backward: gathers); what remains is
    one fp32 accumulate per Swin block into its ``(heads, table rows + 1 + SPREAD_ROWS)`` buffer."""
    model = tiny_model(kind, shared_mask=shared).train()
    h, w = model.encoder.patch_embed.img_size
    grid = unit_grid((h, w), model.unit)
    mask = random_mask(3, grid.num_units, 0.75, shared=shared, generator=torch.Generator().manual_seed(0))
    plan = model.encoder.planner(static=True, shared_mask=shared).plan(mask)  # static: padding slots and groups
    assert any(s.num_slots > s.tokens for stage in plan.layouts for s in stage.values()), "the test needs padding"
    loss, _, _ = model(torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(1)), plan=plan)
    with AccumulateRecorder() as rec:
        loss.backward()
    assert rec.ops > 100, "the recorder saw the backward"
    tables = [m.relative_position_bias_table for m in model.encoder.modules() if hasattr(m, "relative_position_bias_table")]
    allowed = {(t.shape[1], t.shape[0] + 1 + SPREAD_ROWS) for t in tables}
    assert [a for a in rec.accumulates if a[1] not in allowed] == []
    assert len(rec.accumulates) == len(tables)  # one per Swin block, none for Twins
