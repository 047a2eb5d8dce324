"""The visible-only Swin encoder against timm (mask ratio 0) and a dense masked reference (ratio > 0)."""
import pytest
import timm
import torch

from conftest import SWIN_NAME, TINY_SWIN
from greenmim.plan.masking import random_mask, unit_grid
from greenmim.models import UnknownModelError, create_encoder
from greenmim.plan.windows import tokens_to_grid
from swin_reference import dense_masked_swin


def make_pair(img_size=224, **overrides):
    kw = dict(TINY_SWIN, img_size=img_size, **overrides)
    ref = timm.create_model(SWIN_NAME, pretrained=False, **kw).eval()
    enc = create_encoder(SWIN_NAME, **kw).eval()
    result = enc.load_state_dict(ref.state_dict(), strict=False)
    assert result.missing_keys == []
    assert sorted(result.unexpected_keys) == ["head.fc.bias", "head.fc.weight"]
    return ref, enc


@pytest.mark.parametrize("window", [7, 14])
@pytest.mark.parametrize("fused", [True, False])
def test_equals_timm_at_mask_ratio_zero(window, fused):
    torch.manual_seed(0)
    ref, enc = make_pair(window_size=window)
    enc.fused_attn = fused
    assert any(any(b.shift_size) for layer in ref.layers for b in layer.blocks), "shifted blocks are covered"
    images = torch.randn(2, 3, 224, 224)
    mask = torch.zeros(2, 49, dtype=torch.bool)
    with torch.no_grad():
        expected = ref.forward_features(images).flatten(1, 2)
        got = enc(images, mask)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_equals_timm_non_square_with_partial_shift():
    # 128x256: the last stage is 4x8 with window 4, so only the width is shifted
    torch.manual_seed(0)
    ref, enc = make_pair(img_size=(128, 256), window_size=4)
    images = torch.randn(2, 3, 128, 256)
    with torch.no_grad():
        expected = ref.forward_features(images).flatten(1, 2)
        got = enc(images, torch.zeros(2, 32, dtype=torch.bool))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("window,shared", [(7, False), (14, False), (7, True)])
def test_equals_dense_masked_reference(window, shared):
    torch.manual_seed(1)
    ref, enc = make_pair(window_size=window)
    images = torch.randn(3, 3, 224, 224)
    mask = random_mask(3, 49, 0.75, shared=shared, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, dense_stages = dense_masked_swin(ref, images, mask)
        got = enc(images, mask)
        stages = enc.forward_stages(images, mask)
    assert got.shape == (3, 12, enc.num_features)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    # per-stage features: visible positions of the dense map, zeros elsewhere
    grid = unit_grid(224, 32)
    for i, (tokens, dense) in enumerate(zip(stages, dense_stages)):
        t = 8 >> i
        got_map = tokens_to_grid(tokens, mask, (grid.height, grid.width), t)
        keep = (~mask).view(3, 1, 7, 1, 7, 1).expand(-1, 1, -1, t, -1, t).reshape(3, 1, 7 * t, 7 * t)
        torch.testing.assert_close(got_map, dense.permute(0, 3, 1, 2) * keep, atol=2e-5, rtol=1e-4)


def test_gradients_equal_dense_masked_reference():
    torch.manual_seed(2)
    ref, enc = make_pair()
    images = torch.randn(2, 3, 224, 224)
    mask = random_mask(2, 49, 0.75, generator=torch.Generator().manual_seed(0))
    weight = torch.randn(2, 12, enc.num_features)
    (dense_masked_swin(ref, images, mask)[0] * weight).sum().backward()
    (enc(images, mask) * weight).sum().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in enc.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-4, rtol=1e-3, msg=name)


def test_bf16_autocast_runs_close_to_fp32():
    torch.manual_seed(0)
    _, enc = make_pair()
    images = torch.randn(2, 3, 224, 224)
    mask = random_mask(2, 49, 0.75, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = enc(images, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = enc(images, mask)
    assert torch.isfinite(half).all()
    assert (half.float() - full).abs().mean() < 0.05 * full.abs().mean()


def test_clear_errors_for_bad_images_and_names():
    enc = create_encoder(SWIN_NAME, **TINY_SWIN)
    with pytest.raises(ValueError, match="not a multiple of the mask unit"):
        enc(torch.randn(1, 3, 230, 230), torch.zeros(1, 49, dtype=torch.bool))
    with pytest.raises(ValueError, match="img_size=256"):
        enc(torch.randn(1, 3, 256, 256), torch.zeros(1, 64, dtype=torch.bool))
    with pytest.raises(UnknownModelError, match="unknown model 'swin_tiny_patch4_window7'.*did you mean"):
        create_encoder("swin_tiny_patch4_window7", **TINY_SWIN)
    with pytest.raises(ValueError, match="same, non-zero number of visible units"):
        enc(torch.randn(2, 3, 224, 224), torch.tensor([[False] * 49, [True] * 10 + [False] * 39]))
