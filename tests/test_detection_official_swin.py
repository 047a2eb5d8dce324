"""Backbone export in the official Swin layout: inverse of timm's own official -> timm conversion."""
import timm
import torch
from timm.models.swin_transformer import PatchMerging, checkpoint_filter_fn

from greenmim.tasks.detect import build_maskrcnn
from greenmim.cli.official_swin import export_official, main
from greenmim.weights.official_swin import official_to_timm_swin, timm_to_official_swin

SWIN = "swin_tiny_patch4_window7_224"
TINY = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))


def official_patch_merging(x, merge):
    """The official Swin PatchMerging (x0..x3 concatenation) with timm's weights; x: (B, H, W, C)."""
    x0, x1, x2, x3 = x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]
    return merge.reduction(merge.norm(torch.cat([x0, x1, x2, x3], -1)))


def test_timm_patch_merging_has_the_official_channel_order():
    torch.manual_seed(0)
    merge = PatchMerging(8)
    x = torch.randn(2, 6, 10, 8)
    assert torch.allclose(merge(x), official_patch_merging(x, merge), atol=1e-6)


def test_export_is_the_inverse_of_timms_checkpoint_filter():
    torch.manual_seed(0)
    model = timm.create_model(SWIN, num_classes=0, **TINY)
    state = model.state_dict()
    official = timm_to_official_swin(state)
    assert "layers.0.downsample.reduction.weight" in official and "layers.3.downsample.norm.weight" not in official
    assert "layers.1.downsample.reduction.weight" in official and not any(k.startswith("head") for k in official)
    assert "layers.0.blocks.0.attn.relative_position_index" in official
    assert official["layers.0.downsample.reduction.weight"] is state["layers.1.downsample.reduction.weight"]
    back = checkpoint_filter_fn(dict(official), model)  # timm's own official -> timm conversion
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert set(official_to_timm_swin(official)) == set(state)


def test_export_from_a_detector_checkpoint_includes_the_output_norms(tmp_path):
    torch.manual_seed(0)
    det = build_maskrcnn(SWIN, 2, min_size=64, max_size=96, fpn_channels=16, **TINY)
    src = tmp_path / "det.pt"
    torch.save({"format": "greenmim-checkpoint", "model": det.state_dict()}, src)
    out = tmp_path / "official.pth"
    assert main([str(src), str(out)]) == 0
    official = torch.load(out)["model"]
    assert {f"norm{i}.weight" for i in range(4)} <= set(official)
    assert torch.equal(official["layers.2.downsample.reduction.weight"],
                       det.state_dict()["backbone.trunk.model.layers.3.downsample.reduction.weight"])
    assert not any(k.startswith(("fpn", "rpn", "roi_heads", "backbone")) for k in official)


def test_export_from_a_pretraining_checkpoint(tmp_path):
    from greenmim.models import create_pretrain_model

    pre = create_pretrain_model(SWIN, img_size=64, window_size=2, decoder_dim=16, decoder_heads=2, **TINY)
    src = tmp_path / "pre.pt"
    torch.save({"model": pre.state_dict()}, src)
    official = export_official(str(src), str(tmp_path / "o.pth"))
    assert not any(k.startswith(("decoder", "encoder")) for k in official)
    assert torch.equal(official["patch_embed.proj.weight"], pre.encoder.patch_embed.proj.weight)
