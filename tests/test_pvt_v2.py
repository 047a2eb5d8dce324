"""Visible-only PVTv2: the registry against timm's entrypoints, timm's outputs and gradients at mask
ratio 0, the dense masked reference at 0.75 (values per stage and gradients, both backends), the
all-token baseline, a pretraining step per method, activation checkpointing and the refusals."""
import pytest
import timm
import torch

from greenmim.models import UnknownModelError, create_encoder, create_pretrain_model, list_encoders
from greenmim.models.pvt_v2 import PVT_V2_ARCHS
from greenmim.plan.windows import tokens_to_grid
from pvt_v2_reference import CONFIGS, DEFAULT_SR, SMALL_SR, build, dense_masked_reference
from twins_reference import dense_visible, inputs, skip_without


def arch(model):
    """timm's PVTv2 constructor arguments, read back from a built model."""
    stages = model.stages
    return dict(
        depths=tuple(len(s.blocks) for s in stages),
        embed_dims=tuple(s.norm.normalized_shape[0] for s in stages),
        num_heads=tuple(s.blocks[0].attn.num_heads for s in stages),
        sr_ratios=tuple(s.blocks[0].attn.sr.stride[0] if s.blocks[0].attn.sr is not None else 1 for s in stages),
        mlp_hidden=tuple(s.blocks[0].mlp.fc1.out_features for s in stages),
    )


def param_grads(model, out, weight):
    model.zero_grad()
    (out * weight).sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_registry_matches_timm_entrypoints():
    names = list_encoders("pvt_v2")
    assert names == sorted(PVT_V2_ARCHS) == [f"pvt_v2_b{i}" for i in range(6)]
    assert set(timm.list_models("pvt_v2*")) == set(names) | {"pvt_v2_b2_li"}
    for name in names:  # on the meta device: shapes and structure only, no memory
        ref = timm.create_model(name, device="meta")
        table = PVT_V2_ARCHS[name]
        expected = dict(depths=table["depths"], embed_dims=table["embed_dims"], num_heads=table["num_heads"],
                        sr_ratios=(8, 4, 2, 1), mlp_hidden=tuple(int(c * r) for c, r in zip(table["embed_dims"], table.get("mlp_ratios", (8, 8, 4, 4)))))
        assert arch(ref) == expected, name
        # our classes pass the table to timm's constructor: built for two names, both methods (the deep ones only cost time)
        for method in ("greenmim", "simmim") if name in ("pvt_v2_b0", "pvt_v2_b2") else ():
            ours = create_encoder(name, method=method, device="meta")
            shapes = {k: v.shape for k, v in ref.state_dict().items() if not k.startswith("head.")}
            assert {k: v.shape for k, v in ours.state_dict().items()} == shapes, (name, method)
            assert arch(ours) == expected, (name, method)
            assert ours.unit == 32 and ours.num_features == ref.num_features and ours.patch_embed.img_size == (224, 224)


@pytest.mark.parametrize("kind,backend", [("default_sr", "native"), ("small_sr", "spconv")])
def test_equals_timm_at_ratio_0(kind, backend):
    skip_without(backend)
    ref, enc = build(CONFIGS[kind], backend)
    images, mask = inputs(enc, ratio=0.0)
    expected = ref.forward_features(images).flatten(2).transpose(1, 2)  # (B, units, C), raster order
    got = enc(images, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    weight = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    expected_grads, got_grads = param_grads(ref, expected, weight), param_grads(enc, got, weight)
    assert set(got_grads) == set(expected_grads) - {"head.weight", "head.bias"}
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "kind,shared,backend", [("default_sr", False, "native"), ("small_sr", True, "native"), ("small_sr", False, "spconv")]
)
def test_equals_dense_masked_reference(kind, shared, backend):
    skip_without(backend)
    ref, enc = build(CONFIGS[kind], backend)
    images, mask = inputs(enc, ratio=0.75, seed=3, shared=shared)
    grid = (images.shape[2] // enc.unit, images.shape[3] // enc.unit)
    ref_stages, ref_final = dense_masked_reference(ref, images, mask)
    stages = enc.forward_stages(images, mask)
    final = stages[-1]
    assert final.shape == (2, int((~mask[0]).sum()), enc.num_features)
    torch.testing.assert_close(final, ref_final, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for i, (got, expected) in enumerate(zip(stages, ref_stages)):
            t = enc.tokens_per_unit(i)
            got, expected = tokens_to_grid(got, mask, grid, t), dense_visible(expected, mask, grid, t)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"stage {i}")
    # gradients of every parameter through the visible outputs (hidden positions never reach them)
    weight = torch.randn(final.shape, generator=torch.Generator().manual_seed(1))
    expected_grads, got_grads = param_grads(ref, ref_final, weight), param_grads(enc, final, weight)
    assert set(got_grads) == set(expected_grads)
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-4, rtol=1e-4, msg=name)


def test_all_token_baseline_equals_timm_without_mask():
    ref, enc = build(DEFAULT_SR, method="simmim")
    images, mask = inputs(enc, ratio=0.0)
    token = torch.randn(enc.embed_dim)
    with torch.no_grad():
        expected = ref.forward_features(images).flatten(2).transpose(1, 2)
        torch.testing.assert_close(enc(images, mask, token), expected, atol=1e-5, rtol=1e-5)
        images, mask = inputs(enc, ratio=0.75)
        assert enc(images, mask, token).shape == (2, mask.shape[1], enc.num_features)


@pytest.mark.parametrize("method", ["greenmim", "simmim"])
def test_pretraining_step_and_grad_checkpointing(method):
    cfg = dict(SMALL_SR)
    name = cfg.pop("name")
    torch.manual_seed(0)
    model = create_pretrain_model(name, method=method, decoder_dim=32, decoder_heads=2, drop_path_rate=0.1, **cfg)
    images = torch.randn(2, 3, 96, 96)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, [0, 2, 4, 5, 6, 8]] = True
    grads = []
    for enable in (False, True):
        model.encoder.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(1)  # the same drop-path draws
        loss, pred, out_mask = model(images, mask=mask)
        loss.backward()
        assert torch.isfinite(loss) and pred.shape == (2, 9, 32 * 32 * 3) and out_mask.sum() == 12
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    enc = model.encoder
    for p in ("patch_embed.proj.weight", "stages.1.downsample.proj.weight", "stages.0.blocks.0.mlp.dwconv.weight",
              "stages.0.blocks.0.attn.sr.weight", "stages.3.norm.weight"):
        g = grads[0][f"encoder.{p}"]
        assert torch.isfinite(g).all() and g.abs().sum() > 0, p
    assert set(grads[0]) == set(grads[1])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)
    assert enc.visible_only == (method == "greenmim")


def test_clear_errors():
    cfg = dict(SMALL_SR)
    name = cfg.pop("name")
    with pytest.raises(UnknownModelError, match="linear SRA.*use pvt_v2_b2"):
        create_encoder("pvt_v2_b2_li")
    with pytest.raises(ValueError, match="linear SRA"):
        create_encoder(name, linear=True, **cfg)
    with pytest.raises(ValueError, match="sr_ratio 4 does not divide the 2x2 tokens"):
        create_encoder(name, **dict(cfg, sr_ratios=(8, 4, 4, 1)))
    enc = create_encoder(name, **cfg)
    with pytest.raises(ValueError, match="img_size=128"):
        enc(torch.randn(1, 3, 128, 128), torch.zeros(1, 16, dtype=torch.bool))
