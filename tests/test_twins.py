"""Visible-only Twins: timm's weights and outputs at mask ratio 0, a dense masked reference at 0.75,
backends agreeing, the all-token baseline, and a pretraining step for each method and backend."""
import pytest
import timm
import torch

from greenmim.plan.masking import random_mask
from greenmim.models import create_encoder, create_pretrain_model, list_encoders
from greenmim.plan.windows import tokens_to_grid
from twins_reference import SVT, CONFIGS, BACKENDS, build, inputs, skip_without, dense_masked_reference, dense_visible


# -- tests ---------------------------------------------------------------------------------------
def test_registry_matches_timm_entrypoints():
    names = list_encoders("twins")
    assert names == sorted(f"twins_{k}_{s}" for k in ("pcpvt", "svt") for s in ("small", "base", "large"))

    def arch(model):
        blocks = [b.attn for stage in model.blocks for b in stage]
        return [(type(a).__name__, a.num_heads, getattr(a, "ws", None), getattr(a, "sr_ratio", None)) for a in blocks]

    for name in names:  # on the meta device: shapes and structure only, no memory
        ours = create_encoder(name, sparse_backend="native", device="meta")
        ref = timm.create_model(name, device="meta")
        shapes = {k: v.shape for k, v in ref.state_dict().items() if not k.startswith("head.")}
        assert {k: v.shape for k, v in ours.state_dict().items()} == shapes, name
        assert arch(ours) == arch(ref), name
        assert ours.unit == 32 and ours.visible_only and ours.num_features == ref.num_features


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["svt", "pcpvt"])
def test_equals_timm_at_ratio_0(kind, backend):
    skip_without(backend)
    ref, enc = build(CONFIGS[kind], backend)
    images, mask = inputs(enc, ratio=0.0)
    with torch.no_grad():
        expected = ref.forward_features(images)
        got = enc(images, mask)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,shared", [("svt", False), ("pcpvt", False), ("svt", True)])
def test_equals_dense_masked_reference(kind, shared):
    ref, enc = build(CONFIGS[kind])
    images, mask = inputs(enc, ratio=0.75, seed=3, shared=shared)
    grid = (images.shape[2] // enc.unit, images.shape[3] // enc.unit)
    with torch.no_grad():
        ref_stages, ref_final = dense_masked_reference(ref, images, mask)
        stages = enc.forward_stages(images, mask)
        final = enc(images, mask)
    assert final.shape == (2, int((~mask[0]).sum()), enc.num_features)
    torch.testing.assert_close(final, ref_final, atol=1e-5, rtol=1e-5)
    for i, (got, expected) in enumerate(zip(stages, ref_stages)):
        t = enc.tokens_per_unit(i)
        got, expected = tokens_to_grid(got, mask, grid, t), dense_visible(expected, mask, grid, t)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"stage {i}")


def test_fused_and_plain_attention_agree():
    _, enc = build(SVT)
    images, mask = inputs(enc)
    with torch.no_grad():
        fused = enc(images, mask)
        enc.fused_attn = False
        plain = enc(images, mask)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    assert set(enc.last_grouping) == {"ms", "efficiency", "inline"} and enc.last_grouping["inline"] == 1.0 and 0 < enc.last_grouping["efficiency"] <= 1


@pytest.mark.parametrize("kind", ["svt", "pcpvt"])
def test_backends_agree_values_and_gradients(kind):
    pytest.importorskip("spconv.pytorch")
    _, native = build(CONFIGS[kind], "native")
    _, sparse = build(CONFIGS[kind], "spconv")
    images, mask = inputs(native, seed=5)
    out_n, out_s = native(images, mask), sparse(images, mask)
    torch.testing.assert_close(out_n, out_s, atol=1e-5, rtol=1e-5)
    weight = torch.randn(out_n.shape, generator=torch.Generator().manual_seed(1))
    (out_n * weight).sum().backward()
    (out_s * weight).sum().backward()
    grads_s = dict(sparse.named_parameters())
    for name, p in native.named_parameters():
        torch.testing.assert_close(p.grad, grads_s[name].grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["svt", "pcpvt"])
def test_all_token_baseline_equals_timm_without_mask(kind):
    cfg = dict(CONFIGS[kind])
    name = cfg.pop("name")
    torch.manual_seed(0)
    ref = timm.create_model(name, **cfg).eval()
    enc = create_encoder(name, method="simmim", **cfg).eval()
    enc.load_state_dict(ref.state_dict(), strict=False)
    images, mask = inputs(enc, ratio=0.0)
    token = torch.randn(enc.embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(enc(images, mask, token), ref.forward_features(images), atol=1e-5, rtol=1e-5)
        images, mask = inputs(enc, ratio=0.75)
        assert enc(images, mask, token).shape == (2, mask.shape[1], enc.num_features)


@pytest.mark.parametrize(
    "method,backend", [("greenmim", "native"), ("greenmim", "spconv"), ("greenmim", "auto"), ("simmim", "native")]
)
def test_pretraining_step(method, backend):
    skip_without(backend)
    cfg = dict(SVT)
    name = cfg.pop("name")
    torch.manual_seed(0)
    model = create_pretrain_model(
        name, method=method, sparse_backend=backend, decoder_dim=32, decoder_heads=2, drop_path_rate=0.1, **cfg
    )
    images = torch.randn(2, 3, 96, 96)
    loss, pred, mask = model(images, mask_ratio=0.75)
    loss.backward()
    assert torch.isfinite(loss) and pred.shape == (2, 9, 32 * 32 * 3) and mask.sum() == 2 * 7
    enc = model.encoder
    for p in (enc.patch_embeds[0].proj.weight, enc.patch_embeds[1].proj.weight, enc.pos_block[0].proj[0].weight,
              enc.blocks[0][1].attn.sr.weight, enc.blocks[0][0].attn.qkv.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["greenmim", "simmim"])
def test_grad_checkpointing_matches(method):
    cfg = dict(SVT)
    name = cfg.pop("name")
    torch.manual_seed(0)
    model = create_pretrain_model(name, method=method, sparse_backend="native", decoder_dim=32, decoder_heads=2, **cfg)
    images = torch.randn(2, 3, 96, 96)
    mask = random_mask(2, 9, 0.75, generator=torch.Generator().manual_seed(0))
    grads = []
    for enable in (False, True):
        model.encoder.set_grad_checkpointing(enable)
        model.zero_grad()
        model(images, mask=mask)[0].backward()
        grads.append(model.encoder.patch_embeds[0].proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_clear_errors():
    cfg = dict(SVT)
    name = cfg.pop("name")
    with pytest.raises(ValueError, match="LSA window"):
        create_encoder(name, **dict(cfg, wss=(5, 5, 5, 5)))
    with pytest.raises(ValueError, match="sr_ratio"):
        create_encoder(name, **dict(cfg, sr_ratios=(8, 8, 2, 1)))
    with pytest.raises(ValueError, match="sparse_backend"):
        create_encoder(name, sparse_backend="gpu", **cfg)
    enc = create_encoder(name, sparse_backend="native", **cfg)
    with pytest.raises(ValueError, match="img_size=128"):
        enc(torch.randn(1, 3, 128, 128), torch.zeros(1, 16, dtype=torch.bool))
