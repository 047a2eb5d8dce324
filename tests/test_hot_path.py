"""The GPU hot path, checked on CPU: fp32 bias gradients, planning ahead of the step, and a step
that never reads a device value back (run on the ``meta`` device, which has no values to read).
CUDA-only checks at the end are skipped without a GPU."""
import numpy as np
import pytest
import torch

from conftest import SWIN_NAME, TINY_SWIN, tiny_model
from greenmim.plan.collate import MaskCollator, planner_for
from greenmim.engine.optim import build_optimizer
from greenmim.plan.masking import random_mask, seeded_masks, unit_grid
from greenmim.ops.group_attention import GroupLayout, relative_position_bias
from greenmim.plan.slots import plan_group_slots
from greenmim.plan.windows import stage_windows

def stage1_layout(batch=4, shift=3):
    mask = random_mask(batch, 49, 0.5, generator=torch.Generator().manual_seed(0)).numpy()
    win = stage_windows(mask, (7, 7), tokens_per_unit=8, window=7, shift=shift)
    return GroupLayout.from_slots(plan_group_slots(win), torch.device("cpu"))


def test_bias_gradient_equals_float64_reference():
    layout = stage1_layout()
    table = torch.randn(169, 3, requires_grad=True)
    bias = relative_position_bias(layout, table, torch.float32)
    upstream = torch.randn(bias.shape).masked_fill(torch.isinf(bias), 0)
    (bias.masked_fill(torch.isinf(bias), 0) * upstream).sum().backward()

    table64 = table.detach().double().requires_grad_()
    ext = torch.cat([table64, torch.zeros(1, 3, dtype=torch.float64)])
    ref = ext[layout.rel_index.long()].view(layout.num_groups, layout.group_size, layout.group_size, 3).permute(0, 3, 1, 2)
    (ref * upstream.double()).sum().backward()
    assert table.grad.dtype == torch.float32
    # an fp32 sum of ~2000 terms is exact to a few ulps of its terms' magnitude, not of its (cancelling)
    # value: bound the error by sum |upstream| per table entry (a bf16 or wrong-index sum is far off)
    ones = torch.ones_like(table64, requires_grad=True)
    mag = torch.cat([ones, torch.zeros(1, 3, dtype=torch.float64)])[layout.rel_index.long()]
    (mag.view(layout.num_groups, layout.group_size, layout.group_size, 3).permute(0, 3, 1, 2) * upstream.double().abs()).sum().backward()
    err = (table.grad.double() - table64.grad).abs()
    assert (err <= 1e-6 * ones.grad + 1e-6).all(), (err / ones.grad).max()


def test_cpu_bias_backward_index_is_int64():
    # the CPU's index_add_ takes a per-index slow path with int32 indices (~100x: ~120 ms per Swin-T
    # stage-1 block at batch 8); the layout keeps int32 for the forward gather and on GPUs
    layout = stage1_layout()
    assert layout.rel_index.dtype == torch.int32
    assert layout.rel_index_backward.dtype == torch.int64
    allowed = layout.rel_index < layout.num_rel
    assert torch.equal(layout.rel_index_backward[allowed], layout.rel_index[allowed].long())


def test_bias_gradient_accumulates_in_fp32_under_bf16_autocast():
    # thousands of pairs share each row: a bf16 sum of ones stalls at 256, an fp32 one is exact
    layout = stage1_layout()
    table = torch.zeros(169, 2, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bias = relative_position_bias(layout, table, torch.bfloat16)
    assert bias.dtype == torch.bfloat16
    bias.float().masked_fill(torch.isinf(bias), 0).sum().backward()
    pairs = torch.bincount(layout.rel_index.long(), minlength=170)[:169].float()
    assert pairs.max() > 2000, "the test needs rows with many pairs"
    assert table.grad.dtype == torch.float32
    torch.testing.assert_close(table.grad, pairs[:, None].expand(-1, 2).contiguous(), rtol=0, atol=0)


@pytest.mark.parametrize("broadcast", [False, True])
def test_slots_and_tokens_are_inverse_permutations_padding_reads_the_zero_row(broadcast):
    mask = random_mask(2, 49, 0.75, generator=torch.Generator().manual_seed(1)).numpy()
    slots = plan_group_slots(stage_windows(mask[:1] if broadcast else mask, (7, 7), 8, 7, 3), broadcast=broadcast)
    real = torch.zeros(slots.num_slots, dtype=torch.bool)
    real[slots.token_slot.long()] = True
    assert (~real).any() and int(real.sum()) == slots.tokens, "the test needs padding; every token has its own slot"
    assert torch.equal(slots.slot_token[slots.token_slot.long()], torch.arange(slots.tokens, dtype=torch.int32))
    assert (slots.slot_token[~real] == slots.tokens).all()  # the zero row


@pytest.mark.parametrize("kind", ["swin", "twins", "swinv2", "pvt_v2"])
def test_full_step_runs_on_meta_device(kind):
    """Forward, backward and optimizer step with every tensor on ``meta``: any read of a device value
    on the host (``.item()``, ``.cpu()``, ``nonzero``, boolean indexing, a data-dependent shape)
    raises there, so this is the CPU check that the step never synchronises."""
    model = tiny_model(kind).to("meta").train()
    h, w = model.encoder.patch_embed.img_size
    grid = unit_grid((h, w), model.unit)
    optimizer = build_optimizer(model, 1e-4, weight_decay=0.05, betas=(0.9, 0.95))
    collate = MaskCollator(grid, 0.75, model.encoder.planner())
    batch = collate([(torch.zeros(3, h, w), seed) for seed in range(3)])  # planned on the host, ahead
    images = torch.empty(3, 3, h, w, device="meta")
    loss, pred, mask = model(images, plan=batch.plan)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert loss.device.type == "meta" and mask.device.type == "meta"
    assert pred.shape == (3, grid.num_units, model.unit ** 2 * 3)


@pytest.mark.parametrize("kind,shared", [("swin", False), ("swin", True), ("twins", False), ("swinv2", True), ("pvt_v2", True)])
def test_planned_batches_equal_inline_planning(kind, shared):
    """The loader's plan (masks drawn from the samples' seeds) gives the model's own result."""
    model = tiny_model(kind, shared_mask=shared).eval()
    h, w = model.encoder.patch_embed.img_size
    grid = unit_grid((h, w), model.unit)
    images = torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(0))
    batch = MaskCollator(grid, 0.75, planner_for(model, "cpu"), shared=shared)([(img, 100 + i) for i, img in enumerate(images)])
    assert torch.equal(batch.mask, seeded_masks([100, 101, 102], grid.num_units, 0.75, shared=shared))
    assert (batch.mask.sum(1) == grid.num_units - max(1, int(grid.num_units * 0.25))).all()
    assert shared == bool((batch.mask == batch.mask[:1]).all())
    with torch.no_grad():
        planned = model(batch.images, plan=batch.plan)
        inline = model(images, mask=batch.mask)
    assert model.encoder.last_grouping["inline"] == 1.0
    for a, b in zip(planned, inline):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_group_multiple_aligns_group_sizes():
    mask = random_mask(4, 49, 0.75, generator=torch.Generator().manual_seed(2)).numpy()
    win = stage_windows(mask, (7, 7), 8, 7, 0)
    assert plan_group_slots(win, group_multiple=8).group_size % 8 == 0
    padded = plan_group_slots(win, pad_groups_to=16)
    assert padded.num_groups % 16 == 0 and padded.num_groups >= plan_group_slots(win).num_groups


def test_seeded_masks_depend_on_the_seed_only():
    a = seeded_masks([5, 6, 7], 49, 0.75)
    b = seeded_masks([9, 6, 5], 49, 0.75)
    assert torch.equal(a[0], b[2]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], a[2])
    assert (a.sum(1) == 49 - 12).all()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("kind,shared", [("swin", False), ("swin", True), ("twins", False), ("swinv2", False), ("pvt_v2", False)])
def test_cuda_step_never_synchronises(kind, shared):
    model = tiny_model(kind, shared_mask=shared).cuda().train()
    h, w = model.encoder.patch_embed.img_size
    grid = unit_grid((h, w), model.unit)
    optimizer = build_optimizer(model, 1e-4, weight_decay=0.05, betas=(0.9, 0.95))
    collate = MaskCollator(grid, 0.75, model.encoder.planner(group_multiple=8), shared=shared)
    for step in range(3):
        batch = collate([(torch.randn(3, h, w), 10 * step + i) for i in range(4)]).pin_memory()
        images = batch.images.cuda(non_blocking=True)
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _, _ = model(images, plan=batch.plan)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()


@cuda
def test_cuda_bias_gradient_fp32_and_matches_cpu():
    layout = stage1_layout(batch=8)
    table = torch.randn(169, 4)
    grads = []
    for device in ("cpu", "cuda"):
        t = table.clone().to(device).requires_grad_()
        lay = GroupLayout.from_slots(layout.slots, torch.device(device))
        with torch.autocast(device, dtype=torch.bfloat16):
            bias = relative_position_bias(lay, t, torch.bfloat16)
        bias.float().masked_fill(torch.isinf(bias), 0).sum().backward()
        grads.append(t.grad.cpu())
    assert grads[1].dtype == torch.float32
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@cuda
@pytest.mark.parametrize("shared", [False, True])
def test_cuda_swin_equals_timm_and_dense_masked_reference(shared):
    import timm
    from greenmim.models import create_encoder
    from swin_reference import dense_masked_swin

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    ref = timm.create_model(SWIN_NAME, pretrained=False, **TINY_SWIN).eval().cuda()
    enc = create_encoder(SWIN_NAME, **TINY_SWIN).eval().cuda()
    enc.load_state_dict(ref.state_dict(), strict=False)
    images = torch.randn(3, 3, 224, 224, device="cuda")
    with torch.no_grad():
        zero = enc(images, torch.zeros(3, 49, dtype=torch.bool))
        torch.testing.assert_close(zero, ref.forward_features(images).flatten(1, 2), atol=3e-5, rtol=1e-4)
        mask = random_mask(3, 49, 0.75, shared=shared, generator=torch.Generator().manual_seed(3))
        expected, _ = dense_masked_swin(ref, images, mask.cuda())
        torch.testing.assert_close(enc(images, mask), expected, atol=3e-5, rtol=1e-4)


@cuda
@pytest.mark.parametrize("kind", ["swin", "twins", "swinv2"])
def test_cuda_visible_equals_cpu_in_fp32(kind):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = tiny_model(kind).eval()
    h, w = model.encoder.patch_embed.img_size
    images = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    mask = random_mask(2, unit_grid((h, w), model.unit).num_units, 0.75, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cpu = model.encoder(images, mask)
        gpu = model.cuda().encoder(images.cuda(), mask)
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), atol=3e-5, rtol=1e-4)


@cuda
@pytest.mark.parametrize("skip", [False, True])
def test_cuda_trainer_optimizer_step_skips_on_device_without_sync(skip):
    from greenmim.engine import Precision, TrainingStep

    model = tiny_model("swin").cuda()
    optimizer = build_optimizer(model, 1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    step = TrainingStep(model, optimizer, Precision("bf16", torch.device("cuda")), clip_grad=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    scale = torch.tensor(float("nan") if skip else 1.0, device="cuda")  # a non-finite loss skips the step

    def loss_fn(model, batch):
        return scale * sum(p.float().square().sum() for p in model.parameters()), {}

    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step([None], loss_fn)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert bool(out.skipped) == skip and changed == (not skip) and torch.isfinite(out.grad_norm)


def _planned_loader(n_batches=4, fail_at=None):
    from torch.utils.data import DataLoader

    model = tiny_model("swin")
    grid = unit_grid((224, 224), model.unit)
    collate = MaskCollator(grid, 0.75, model.encoder.planner())

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return 2 * n_batches

        def __getitem__(self, i):
            if i == fail_at:
                raise OSError(f"unreadable image {i}")
            return torch.full((3, 224, 224), float(i)), i

    return model, DataLoader(Samples(), batch_size=2, collate_fn=collate)


def test_prefetcher_moves_planned_batches_ahead_and_wraps_the_loader_without_impersonating_it():
    from greenmim.data.prefetch import DevicePrefetcher
    from greenmim.plan.planner import DevicePlan

    model, loader = _planned_loader()
    prefetched = DevicePrefetcher(loader, torch.device("cpu"))
    assert len(prefetched) == len(loader) and prefetched.loader is loader  # the sampler, batch size, workers: on .loader
    assert not any(hasattr(prefetched, name) for name in ("sampler", "batch_size", "num_workers", "worker_init_fn"))
    batches = list(prefetched)
    assert len(batches) == 4 and all(isinstance(b.plan, DevicePlan) for b in batches)
    assert [float(b.images[0, 0, 0, 0]) for b in batches] == [0.0, 2.0, 4.0, 6.0]  # order kept
    with torch.no_grad():  # a prefetched batch gives what the host batch gives
        got = model(batches[1].images, plan=batches[1].plan)[0]
        want = model(list(loader)[1].images, plan=list(loader)[1].plan)[0]
    assert torch.equal(got, want)
    for _ in zip(range(1), prefetched):  # stopping early does not hang
        pass


def test_prefetcher_reraises_loader_errors_in_the_training_thread():
    from greenmim.data.prefetch import DevicePrefetcher

    _, loader = _planned_loader(fail_at=5)
    with pytest.raises(OSError, match="unreadable image 5"):
        list(DevicePrefetcher(loader, torch.device("cpu")))


@cuda
def test_cuda_prefetched_steps_equal_direct_steps_without_sync():
    from torch.utils.data import DataLoader

    from greenmim.data.prefetch import DevicePrefetcher

    model = tiny_model("swin").cuda().eval()
    grid = unit_grid((224, 224), model.unit)
    collate = MaskCollator(grid, 0.75, model.encoder.planner(group_multiple=8))
    samples = [(torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(i)), i) for i in range(8)]
    loader = DataLoader(samples, batch_size=2, collate_fn=collate, num_workers=1, pin_memory=True)
    with torch.no_grad():
        direct = [model(b.images.cuda(), plan=b.plan)[0] for b in loader]
        torch.cuda.set_sync_debug_mode("error")
        try:
            prefetched = [model(b.images, plan=b.plan)[0] for b in DevicePrefetcher(loader, torch.device("cuda"))]
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert len(prefetched) == len(direct) == 4
    for a, b in zip(prefetched, direct):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
