"""The Swin V2 encoders against timm (mask ratio 0) and the dense masked reference (ratio 0.75),
values and gradients, per-sample and shared masks, free and static plans; the registry table
against timm's entrypoints."""
import math

import pytest
import timm
import torch

from greenmim.plan.masking import random_mask, unit_grid
from greenmim.models import create_encoder, list_encoders
from greenmim.models.swinv2 import SWINV2_ARCHS
from greenmim.plan.windows import tokens_to_grid
from swin_reference import dense_masked_swin

NAME = "swinv2_tiny_window8_256"
# 96 px: 3x3 units (2 visible at mask 0.75); stage grids 24, 12, 6, 3; two blocks per stage, so shifted
# blocks where the grid exceeds the window (window 3 also crosses the 8x8-token units of stage 1)
TINY = dict(img_size=96, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))


def perturb(model):
    """Make every V2-specific parameter matter: timm initialises the post-norms to zero (each block is
    then the identity) and the q/v biases to zero; one head's logit scale is set past the clamp."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("_bias") or "logit_scale" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
        for layer in model.layers:
            layer.blocks[0].attn.logit_scale[0] = math.log(100.0) + 0.5
    return model


def make_pair(method="greenmim", ref=None, **overrides):
    """(timm's Swin V2, our encoder with its weights); ``ref``: reuse this timm model."""
    kw = dict(TINY, **overrides)
    ref = ref if ref is not None else perturb(timm.create_model(NAME, pretrained=False, **kw)).eval()
    enc = create_encoder(NAME, method=method, **kw).eval()
    result = enc.load_state_dict(ref.state_dict(), strict=False)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == ["head.fc.bias", "head.fc.weight"]
    return ref, enc


@pytest.mark.parametrize("window,pretrained_windows,fused", [(3, (0, 0, 0, 0), True), (6, (4, 4, 4, 2), True), (3, (0, 0, 0, 0), False)])
def test_equals_timm_at_mask_ratio_zero(window, pretrained_windows, fused):
    torch.manual_seed(0)
    ref, enc = make_pair(window_size=window, pretrained_window_sizes=pretrained_windows)
    _, dense = make_pair("simmim", ref, window_size=window, pretrained_window_sizes=pretrained_windows)
    enc.fused_attn = fused
    assert any(any(b.shift_size) for layer in ref.layers for b in layer.blocks), "shifted blocks are covered"
    images = torch.randn(2, 3, 96, 96)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    with torch.no_grad():
        expected = ref.forward_features(images).flatten(1, 2)
        got = enc(images, mask)
        baseline = dense(images, mask, torch.zeros(1, 1, 16))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(baseline, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("shared,static", [(False, False), (True, False), (False, True)])
def test_equals_dense_masked_reference_values_and_gradients(shared, static):
    torch.manual_seed(1)
    ref, enc = make_pair(window_size=3)
    images = torch.randn(3, 3, 96, 96)
    mask = random_mask(3, 9, 0.75, shared=shared, generator=torch.Generator().manual_seed(3))
    plan = enc.planner(static=static, shared_mask=shared).plan(mask)
    weight = torch.randn(3, 2, enc.num_features)

    expected, dense_stages = dense_masked_swin(ref, images, mask)
    got = enc(images, plan=plan)
    assert got.shape == (3, 2, enc.num_features)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    (expected * weight).sum().backward()
    (got * weight).sum().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in enc.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-4, rtol=1e-3, msg=name)
    clamped = enc.layers[1].blocks[0].attn.logit_scale.grad.flatten()
    assert clamped[0] == 0 and clamped[1] != 0, "timm's clamp: no gradient past log(100)"

    # per-stage features: visible positions of the dense map, zeros elsewhere
    with torch.no_grad():
        stages = enc.forward_stages(images, plan=plan)
    grid = unit_grid(96, 32)
    for i, (tokens, dense) in enumerate(zip(stages, dense_stages)):
        t = 8 >> i
        got_map = tokens_to_grid(tokens, mask, (grid.height, grid.width), t)
        keep = (~mask).view(3, 1, 3, 1, 3, 1).expand(-1, 1, -1, t, -1, t).reshape(3, 1, 3 * t, 3 * t)
        torch.testing.assert_close(got_map, dense.detach().permute(0, 3, 1, 2) * keep, atol=2e-5, rtol=1e-4)


def test_pretrain_model_both_methods_train_a_step():
    from greenmim.models import create_pretrain_model

    for method in ("greenmim", "simmim"):
        torch.manual_seed(0)
        model = create_pretrain_model(NAME, method=method, decoder_dim=32, decoder_heads=2, **dict(TINY, window_size=3))
        loss, pred, mask = model(torch.randn(2, 3, 96, 96), mask_ratio=0.75)
        loss.backward()
        assert pred.shape == (2, 9, 32 * 32 * 3) and int(mask.sum()) == 14 and torch.isfinite(loss)
        norm = model.encoder.layers[1].blocks[1].norm1.weight.grad  # timm's post-norms start at zero
        assert norm is not None and norm.abs().sum() > 0, method


def arch(model) -> dict:
    """The constructor arguments of a timm Swin V2, read back from the built model."""
    attn = model.layers[0].blocks[0].attn
    return dict(
        img_size=tuple(model.patch_embed.img_size),
        patch_size=tuple(model.patch_embed.patch_size),
        window_size=tuple(model.layers[0].blocks[0].window_size),
        embed_dim=model.embed_dim,
        depths=tuple(len(stage.blocks) for stage in model.layers),
        num_heads=tuple(stage.blocks[0].attn.num_heads for stage in model.layers),
        pretrained_window_sizes=tuple(stage.blocks[0].attn.pretrained_window_size[0] for stage in model.layers),
        cpb_rows=tuple(tuple(b.attn.relative_coords_table.shape) for stage in model.layers for b in stage.blocks),
    ) | dict(qkv_bias=attn.q_bias is not None)


def test_registry_lists_exactly_the_table():
    assert list_encoders("swinv2") == sorted(SWINV2_ARCHS)
    assert set(SWINV2_ARCHS) == set(timm.list_models("swinv2_*")) - set(timm.list_models("swinv2_cr_*"))


def entrypoint_args(name, monkeypatch) -> dict:
    """The constructor arguments timm's entrypoint ``name`` passes (captured, nothing built), with the
    image size of its pretrained config and the constructor's default patch size."""
    import timm.models.swin_transformer_v2 as v2

    monkeypatch.setattr(v2, "_create_swin_transformer_v2", lambda variant, pretrained=False, **kw: kw)
    args = dict(patch_size=4, **getattr(v2, name)())
    return dict(args, img_size=timm.models.get_pretrained_cfg(name).input_size[-1])


@pytest.mark.parametrize("name", sorted(SWINV2_ARCHS))
def test_table_matches_timm_entrypoint(name, monkeypatch):
    assert SWINV2_ARCHS[name] == entrypoint_args(name, monkeypatch)


def test_encoders_build_timms_architecture():
    """Both encoders of a registered name, built from the table, have timm's architecture and state shapes."""
    name = "swinv2_base_window12to16_192to256"  # pretrained_window_sizes set, windows clamped in the last stages
    ref = timm.create_model(name, pretrained=False, device="meta")
    for method in ("greenmim", "simmim"):
        ours = create_encoder(name, method=method, device="meta")
        assert arch(ours) == arch(ref), method
        shapes = {k: v.shape for k, v in ref.state_dict().items() if not k.startswith("head.")}
        assert {k: v.shape for k, v in ours.state_dict().items()} == shapes, method
        assert ours.unit == 32 and ours.num_features == ref.num_features


def test_compiled_step_equals_eager_without_recompiles():
    """The trainer's compiled step (dynamo's ``eager`` backend: the same capture and guards, no codegen;
    inductor is covered for Swin V1 in test_compiled_step.py) over static plans of different masks."""
    import copy

    from conftest import tiny_model
    from greenmim.plan.collate import MIMBatch, planner_for
    from greenmim.tasks.pretrain.loss import pretrain_loss
    from greenmim.engine.step import compile_counters
    from greenmim.plan.masking import seeded_masks

    torch._dynamo.reset()
    eager = tiny_model("swinv2")
    compiled = torch.compile(copy.deepcopy(eager), backend="eager")
    planner = planner_for(eager, torch.device("cpu"), static=True)
    gen = torch.Generator().manual_seed(0)
    batches = [MIMBatch(torch.randint(0, 256, (2, 3, 128, 128), generator=gen, dtype=torch.uint8),
                        planner.plan(seeded_masks([10 * i, 10 * i + 1], 16, 0.75)).to("cpu")) for i in range(3)]
    before = compile_counters()
    for i, batch in enumerate(batches):
        loss_e = pretrain_loss(eager, batch, torch.device("cpu"))
        loss_c = pretrain_loss(compiled, batch, torch.device("cpu"))
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        if i == 0:
            warm = compile_counters()
    # one eager plan resolution (the model's, passed on to the encoder) is the only break; one in V2's block
    # would add a break and graphs
    assert warm["graph_breaks"] - before["graph_breaks"] == 1
    assert warm["graphs"] - before["graphs"] <= 2
    assert compile_counters()["graphs"] == warm["graphs"], "static plans: no recompiles"
    torch._dynamo.reset()
