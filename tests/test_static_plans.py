"""Static plans (one shape per batch size and mask ratio), shared-mask broadcast, fused baseline."""
import numpy as np
import pytest
import timm
import torch

from conftest import SWIN_NAME, TINY_SWIN
from swin_reference import dense_masked_swin
from greenmim.plan.collate import MaskCollator
from greenmim.plan.masking import random_mask, unit_grid
from greenmim.models import create_encoder
from greenmim.plan.windows import stage_windows
from greenmim.plan.planner import HostPlan
from greenmim.plan.static_shapes import StaticShape, max_window_count
from conftest import tiny_model
from twins_reference import SVT, build, dense_masked_reference



def swin_pair(**overrides):
    kw = dict(TINY_SWIN, **overrides)
    ref = timm.create_model(SWIN_NAME, pretrained=False, **kw).eval()
    enc = create_encoder(SWIN_NAME, **kw).eval()
    enc.load_state_dict(ref.state_dict(), strict=False)
    return ref, enc


# 96 px: 3x3 units; windows of 3 tokens cross the 8x8-token units of stage 1, and every stage has a
# shifted block (planning cost grows with the units: this keeps 50+ batches fast)
SWIN_96 = dict(img_size=96, window_size=3)


def encoder(kind):
    """(visible-only encoder, number of units): a tiny Swin or Twins at 96 px."""
    return (swin_pair(**SWIN_96)[1], 9) if kind == "swin" else (build(SVT)[1], 9)


def shape_signature(plan: HostPlan):
    """The shape of every tensor a plan hands to the device, and of what the device derives from it."""
    sig = [tuple(plan.mask.shape), tuple(plan.vis_idx.shape)]
    sig += [(t, tuple(v.shape)) for t, v in sorted(plan.neighbours.items())]
    for stage in plan.layouts:
        for key, slots in sorted(stage.items(), key=lambda kv: str(kv[0])):
            sig.append((str(key), slots.num_groups, slots.group_size))
            sig += [(name, tuple(t.shape)) for name, t in sorted(slots.tensors().items())]
    return sig


def masks(batch, num_units, count, seed=0, ratio=0.75):
    gen = torch.Generator().manual_seed(seed)
    return [random_mask(batch, num_units, ratio, generator=gen) for _ in range(count)]


@pytest.mark.parametrize("kind", ["swin", "twins"])
def test_static_shapes_identical_over_many_batches(kind):
    enc, units = encoder(kind)
    static, free = enc.planner(static=True), enc.planner()
    plans = [static.plan(m) for m in masks(4, units, 60, seed=len(kind))]
    free_shapes = {str(shape_signature(free.plan(p.mask))) for p in plans}
    assert len(free_shapes) > 1, "the free solver's shapes vary, so the test can tell static from free"
    fitting = [p for p in plans if not p.overflow]
    assert len(fitting) >= 57, "overflow is rare"
    assert len({str(shape_signature(p)) for p in fitting}) == 1
    # the device-side pair tensors follow the slot grid
    layouts = [next(iter(p.to("cpu").layouts[0].values())) for p in fitting[:3]]
    assert len({tuple((lay.rel_index if lay.rel_index is not None else lay.window_mask).shape) for lay in layouts}) == 1


def test_static_shapes_are_deterministic_and_group_multiple_aligned():
    enc, _ = encoder("swin")
    a = enc.planner(group_multiple=8, static=True).static_shapes(4, 3)
    b = enc.planner(group_multiple=8, static=True).static_shapes(4, 3)  # another process would get these too
    assert a == b and all(s.group_size % 8 == 0 for s in a.values())


def test_max_window_count_bounds_every_window_and_is_reached():
    grid, t, window, shift, visible = (7, 7), 2, 7, 3, 12
    bound = max_window_count(grid, t, window, shift, visible)
    seen = max(stage_windows(m.numpy(), grid, t, window, shift).counts.max() for m in masks(16, 49, 20))
    assert seen <= bound <= window * window
    # brute force on a small grid: every mask of 3 visible units out of 9
    from itertools import combinations

    worst = 0
    for vis in combinations(range(9), 3):
        m = np.ones((1, 9), dtype=bool)
        m[0, list(vis)] = False
        worst = max(worst, int(stage_windows(m, (3, 3), 4, 6, 3).counts.max()))
    assert max_window_count((3, 3), 4, 6, 3, 3) == worst


def grads_of(enc, images, plan, weight):
    enc.zero_grad()
    images = images.clone().requires_grad_(True)
    out = enc(images, plan=plan)
    (out * weight).sum().backward()
    return out.detach(), images.grad, {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}


def assert_same_forward_backward(enc, images, plan_a, plan_b):
    weight = torch.randn(images.shape[0], plan_a.vis_idx.shape[1], enc.num_features, generator=torch.Generator().manual_seed(1))
    out_a, img_a, par_a = grads_of(enc, images, plan_a, weight)
    out_b, img_b, par_b = grads_of(enc, images, plan_b, weight)
    torch.testing.assert_close(out_a, out_b, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(img_a, img_b, atol=2e-5, rtol=1e-4)
    assert par_a.keys() == par_b.keys() and par_a
    for name in par_a:
        torch.testing.assert_close(par_a[name], par_b[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["swin", "twins"])
def test_static_plan_equals_free_plan_forward_and_gradients(kind):
    enc, units = encoder(kind)
    h, w = enc.patch_embed.img_size
    images = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    mask = masks(2, units, 1, seed=4)[0]
    static, free = enc.planner(static=True).plan(mask), enc.planner().plan(mask)
    assert shape_signature(static) != shape_signature(free), "padding changes the shapes, not the result"
    assert_same_forward_backward(enc, images, static, free)


def test_overflow_falls_back_to_a_larger_exact_shape():
    enc, units = encoder("swin")
    planner = enc.planner(static=True)
    mask = masks(2, units, 1, seed=5)[0]
    fitted = planner.static_shapes(2, int((~mask[0]).sum()))
    # shrink every static shape below what this batch needs: groups of one slot, a single group
    for key in fitted:
        fitted[key] = StaticShape(1, 1)
    plan = planner.plan(mask)
    assert plan.overflow == sum(len(stage) for stage in plan.layouts)
    for stage in plan.layouts:
        for slots in stage.values():
            real = slots.slot_window >= 0
            assert slots.tokens == int(real.sum())  # every token has its slot
            # g grows to the largest window, no further
            assert slots.group_size == int(np.bincount(slots.slot_window[real].numpy()).max())
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    assert_same_forward_backward(enc, images, plan, enc.planner().plan(mask))


# -- shared masks: one sample planned, its layouts broadcast over the batch ------------------------
@pytest.mark.parametrize("static", [False, True])
def test_shared_mask_broadcast_equals_dense_reference_swin(static):
    ref, enc = swin_pair(**SWIN_96)
    images = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    mask = random_mask(3, 9, 0.5, shared=True, generator=torch.Generator().manual_seed(1))
    plan = enc.planner(static=static, shared_mask=True).plan(mask)
    with torch.no_grad():
        expected, _ = dense_masked_swin(ref, images, mask)
        got = enc(images, plan=plan)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    # and the gradients equal those of the per-sample plan of the same mask
    assert_same_forward_backward(enc, images, plan, enc.planner().plan(mask))


def test_shared_mask_broadcast_equals_dense_reference_twins():
    ref, enc = build(SVT)
    images = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(4))
    mask = random_mask(3, 9, 0.5, shared=True, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, expected = dense_masked_reference(ref, images, mask)
        got = enc(images, plan=enc.planner(shared_mask=True).plan(mask))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_shared_mask_layouts_do_not_grow_with_the_batch():
    enc, _ = encoder("swin")
    planner = enc.planner(shared_mask=True)
    row = random_mask(1, 9, 0.5, generator=torch.Generator().manual_seed(0))
    small, large = planner.plan(row.expand(2, -1)), planner.plan(row.expand(16, -1))
    for stage_small, stage_large in zip(small.layouts, large.layouts):
        for key, slots in stage_small.items():
            assert slots.broadcast and slots.tokens == stage_large[key].tokens
            for name, t in slots.tensors().items():
                assert torch.equal(t, stage_large[key].tensors()[name]), name
    layout = next(iter(large.to("cpu").layouts[0].values()))
    assert layout.rel_index.numel() == layout.num_groups * layout.group_size ** 2  # one sample's pairs
    assert large.vis_idx.shape[0] == 16
    with pytest.raises(ValueError, match="shared_mask=False"):
        planner.plan(random_mask(2, 9, 0.5, generator=torch.Generator().manual_seed(0)))


# -- the all-token baseline runs fused attention ---------------------------------------------------
def baseline_grads(model, images, mask, token, weight):
    model.zero_grad()
    out = model(images, mask, token) if token is not None else model.forward_features(images)
    (out.reshape(weight.shape) * weight).sum().backward()
    return out.detach().reshape(weight.shape), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["swin", "twins"])
def test_baseline_fused_attention_equals_timm_unfused(kind):
    if kind == "swin":
        name, cfg = SWIN_NAME, dict(TINY_SWIN, **SWIN_96)
    else:
        cfg = dict(SVT)
        name = cfg.pop("name")
    torch.manual_seed(0)
    ref = timm.create_model(name, **cfg).eval()  # eval: no stochastic depth
    enc = create_encoder(name, method="simmim", **cfg).eval()
    enc.load_state_dict(ref.state_dict(), strict=False)
    timm_attn = [m for m in ref.modules() if hasattr(m, "fused_attn")]
    ours = [m for m in enc.modules() if hasattr(m, "fused_attn")]
    assert ours and all(m.fused_attn for m in ours)
    for m in timm_attn:
        m.fused_attn = False  # timm's unfused bmm + softmax
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 9, dtype=torch.bool)  # no mask token: the two models see the same tokens
    weight = torch.randn(2, 9, enc.num_features, generator=torch.Generator().manual_seed(2))
    out_ref, grads_ref = baseline_grads(ref, images, None, None, weight)
    out, grads = baseline_grads(enc, images, mask, torch.zeros(enc.embed_dim), weight)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-4)
    assert grads
    for n, g in grads.items():  # fp32 rounding, relative to each gradient's scale
        torch.testing.assert_close(g, grads_ref[n], atol=1e-5 * float(grads_ref[n].abs().max()), rtol=1e-4, msg=n)


@pytest.mark.parametrize("kind,shared", [("swin", True), ("twins", False), ("twins", True)])
def test_static_and_broadcast_steps_run_on_meta_device(kind, shared):
    """A training step planned as on CUDA (static shapes, multiples of 8, broadcast when shared) reads
    no device value: every tensor on ``meta``."""
    model = tiny_model(kind, shared_mask=shared).to("meta").train()
    h, w = model.encoder.patch_embed.img_size
    grid = unit_grid((h, w), model.unit)
    planner = model.encoder.planner(group_multiple=8, static=True, shared_mask=shared)
    batch = MaskCollator(grid, 0.75, planner, shared=shared)([(torch.zeros(3, h, w), seed) for seed in range(3)])
    assert all(s.broadcast == shared for stage in batch.plan.layouts for s in stage.values())
    loss, pred, _ = model(torch.empty(3, 3, h, w, device="meta"), plan=batch.plan)
    loss.backward()
    assert loss.device.type == "meta" and pred.shape == (3, grid.num_units, model.unit ** 2 * 3)
