"""The MIM model: loss on masked units only, decoder positions, gradients, baseline, reconstructions."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import SWIN_NAME, TINY_SWIN
from greenmim.plan.masking import random_mask, unit_grid
from greenmim.models import create_pretrain_model, patchify, unpatchify
from greenmim.models.decoder import sincos_pos_embed_2d

DECODER = dict(decoder_dim=64, decoder_heads=4)


@pytest.fixture(params=["greenmim", "simmim"])
def model(request):
    torch.manual_seed(0)
    return create_pretrain_model(SWIN_NAME, method=request.param, **TINY_SWIN, **DECODER)


def test_call_shape_and_explicit_mask(model):
    images = torch.randn(2, 3, 224, 224)
    mask = random_mask(2, 49, 0.75, generator=torch.Generator().manual_seed(0))
    loss, pred, out_mask = model(images, mask=mask)
    assert pred.shape == (2, 49, 32 * 32 * 3)
    assert torch.equal(out_mask, mask) and loss.ndim == 0 and torch.isfinite(loss)


def test_gradients_reach_every_parameter(model):
    loss, _, _ = model(torch.randn(2, 3, 224, 224), mask_ratio=0.75)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_loss_counts_masked_units_only(model):
    images = torch.randn(2, 3, 224, 224)
    mask = random_mask(2, 49, 0.75, generator=torch.Generator().manual_seed(0))
    target = model.target(images)
    pred = torch.where(mask.unsqueeze(-1), target, torch.randn_like(target) * 100)  # garbage on visible units
    assert model.loss(images, pred, mask).item() == pytest.approx(0.0, abs=1e-10)
    pred = torch.where(mask.unsqueeze(-1), target + 1.0, target)
    assert model.loss(images, pred, mask).item() == pytest.approx(1.0, rel=1e-5)


class RecordOps(TorchDispatchMode):
    """The aten ops run inside the block."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_on_masked_units_equals_the_all_units_formula(norm_pix):
    """The loss gathers the masked units' prediction and builds their target alone: the same value
    and the same gradient (zero on visible units) as the MSE over all units weighted by the mask, with
    a backward that gathers (no atomic scatter-add)."""
    torch.manual_seed(0)
    model = create_pretrain_model(SWIN_NAME, norm_pix_loss=norm_pix, **TINY_SWIN, **DECODER)
    images = torch.randn(3, 3, 224, 224) * 2 + 1
    mask = random_mask(3, 49, 0.75, generator=torch.Generator().manual_seed(1))
    pred = torch.randn(3, 49, 32 * 32 * 3, requires_grad=True)

    loss = model.loss(images, pred, mask, num_masked=int(mask[0].sum()))
    with RecordOps() as ops:
        (grad,) = torch.autograd.grad(loss, pred)
    assert not [op for op in ops.names if "scatter" in op or "index_add" in op or "index_put" in op], ops.names  # no atomics
    per_unit = (pred - model.target(images)).pow(2).mean(dim=-1)  # today's formula, every unit
    ref = (per_unit * mask).sum() / mask.sum()
    (ref_grad,) = torch.autograd.grad(ref, pred)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-9)
    assert grad[~mask].abs().sum() == 0
    torch.testing.assert_close(model.loss(images, pred, mask), loss)  # num_masked read from the mask
    units = torch.tensor([[0, 5, 48], [7, 8, 9], [1, 2, 3]])
    torch.testing.assert_close(model.target(images, units), model.target(images)[torch.arange(3)[:, None], units])


def test_norm_pix_target_is_normalised_per_unit():
    model = create_pretrain_model(SWIN_NAME, **TINY_SWIN, **DECODER)
    target = model.target(torch.rand(1, 3, 224, 224) * 5 + 3)
    torch.testing.assert_close(target.mean(-1), torch.zeros(1, 49), atol=1e-4, rtol=0)
    torch.testing.assert_close(target.std(-1), torch.ones(1, 49), atol=1e-3, rtol=0)


def test_decoder_places_every_visible_unit_at_its_own_position():
    torch.manual_seed(0)
    model = create_pretrain_model(SWIN_NAME, **TINY_SWIN, **DECODER).eval()
    images = torch.randn(2, 3, 224, 224)
    mask = random_mask(2, 49, 0.75, generator=torch.Generator().manual_seed(4))
    seen = {}
    model.decoder.blocks.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(images, mask=mask)
        latent = model.decoder.embed(model.encoder(images, mask))  # (B, 12, D), ascending raster order
    x = seen["x"] - sincos_pos_embed_2d(64, 7, 7)
    for b in range(2):
        vis = (~mask[b]).nonzero().flatten()
        torch.testing.assert_close(x[b, vis], latent[b])
        torch.testing.assert_close(x[b, mask[b]], model.decoder.mask_token[0].expand(37, -1))


def test_patchify_roundtrip_and_reconstruction_images():
    model = create_pretrain_model(SWIN_NAME, **TINY_SWIN, **DECODER)
    images = torch.randn(2, 3, 224, 224)
    grid = unit_grid(224, 32)
    torch.testing.assert_close(unpatchify(patchify(images, 32), grid), images)
    mask = random_mask(2, 49, 0.75, generator=torch.Generator().manual_seed(0))
    # a perfect prediction in the normalised space un-normalises to the original pixels
    views = model.reconstruct(images, model.target(images), mask)
    torch.testing.assert_close(views["reconstruction"], images, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(views["prediction"], images, atol=1e-4, rtol=1e-4)
    hidden = patchify(views["masked"], 32)[mask]
    assert hidden.abs().sum() == 0
