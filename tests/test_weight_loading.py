"""Pretrained weights into timm classifiers: only the head may be missing; everything else is reported."""
import pytest
import timm
import torch
from safetensors.torch import save_file

from greenmim.engine.errors import UserError
from greenmim.tasks.finetune import create_classifier
from greenmim.models import create_pretrain_model, list_encoders

SWIN = "swin_tiny_patch4_window7_224"
SWIN_KW = dict(img_size=64, embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=2)


def twins_case():
    names = list_encoders("twins")
    if not names:
        pytest.skip("greenmim.models has no Twins encoders registered yet")
    name = "twins_svt_small" if "twins_svt_small" in names else names[0]
    return name, dict(img_size=64, embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), wss=(2, 2, 2, 2))


def pretrain_checkpoint(tmp_path, name, kw, method="greenmim"):
    """A checkpoint in the trainer's layout: ``{"format": ..., "model": encoder.* + decoder.* (+ enc_mask_token)}``."""
    torch.manual_seed(0)
    model = create_pretrain_model(name, method=method, decoder_dim=32, decoder_heads=2, **kw)
    path = tmp_path / f"{method}.pt"
    torch.save({"format": "greenmim-checkpoint", "version": 1, "model": model.state_dict(), "epoch": 1, "step": 3}, path)
    return model, path


def assert_encoder_equal(classifier, pretrain_model):
    enc = pretrain_model.encoder.state_dict()
    own = classifier.state_dict()
    for k, v in enc.items():
        assert torch.equal(own[k], v), k


@pytest.mark.parametrize("method", ["greenmim", "simmim"])
def test_greenmim_swin_checkpoint_loads_with_only_head_missing(tmp_path, method):
    pre, path = pretrain_checkpoint(tmp_path, SWIN, SWIN_KW, method)
    model, report = create_classifier(SWIN, num_classes=5, drop_path_rate=0.1, pretrained=str(path), **SWIN_KW)
    assert report.kind == "greenmim-pretrain"
    assert report.missing == ["head.fc.weight", "head.fc.bias"]
    assert report.unexpected == [] and report.resized == []
    assert all(k.startswith(("decoder.", "enc_mask_token")) for k in report.ignored)
    assert ("enc_mask_token" in report.ignored) == (method == "simmim")
    assert_encoder_equal(model, pre)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_greenmim_twins_checkpoint_loads_with_only_head_missing(tmp_path):
    name, kw = twins_case()
    pre, path = pretrain_checkpoint(tmp_path, name, kw)
    model, report = create_classifier(name, num_classes=3, pretrained=str(path), **kw)
    assert report.missing == ["head.weight", "head.bias"] and report.unexpected == []
    assert_encoder_equal(model, pre)


def test_exported_safetensors_and_window_resize(tmp_path):
    pre, _ = pretrain_checkpoint(tmp_path, SWIN, SWIN_KW)
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in pre.encoder.state_dict().items()}, str(path))
    # same architecture: exact copy
    model, report = create_classifier(SWIN, num_classes=2, pretrained=str(path), **SWIN_KW)
    assert report.kind == "safetensors" and report.missing == ["head.fc.weight", "head.fc.bias"]
    assert_encoder_equal(model, pre)
    # larger window at fine-tune time (as SimMIM's 192/W6 -> 224/W7): tables resized by timm's filter
    kw = dict(SWIN_KW, window_size=4)
    model, report = create_classifier(SWIN, num_classes=2, pretrained=str(path), **kw)
    assert report.missing == ["head.fc.weight", "head.fc.bias"]
    assert report.resized and all(k.endswith("relative_position_bias_table") for k in report.resized)
    assert model.layers[0].blocks[0].attn.relative_position_bias_table.shape[0] == 7 * 7


def test_timm_checkpoint_with_other_class_count(tmp_path):
    src = timm.create_model(SWIN, num_classes=10, **SWIN_KW)
    path = tmp_path / "timm.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    model, report = create_classifier(SWIN, num_classes=4, pretrained=str(path), **SWIN_KW)
    assert report.head_dropped == ["head.fc.bias", "head.fc.weight"]
    assert report.missing == ["head.fc.weight", "head.fc.bias"]
    # same class count: the head loads too (e.g. a fine-tuned checkpoint)
    model, report = create_classifier(SWIN, num_classes=10, pretrained=str(path), **SWIN_KW)
    assert report.missing == [] and torch.equal(model.head.fc.weight, src.head.fc.weight)


def test_mismatches_are_errors_naming_keys(tmp_path):
    _, path = pretrain_checkpoint(tmp_path, SWIN, SWIN_KW)
    with pytest.raises(UserError, match="do not fit the model.*embed_dim"):
        create_classifier(SWIN, num_classes=2, pretrained=str(path), **dict(SWIN_KW, embed_dim=48))
    with pytest.raises(UserError, match=r"missing .*layers\.1\.blocks\.1"):
        create_classifier(SWIN, num_classes=2, pretrained=str(path), **dict(SWIN_KW, depths=(1, 2, 1, 1)))
    sd = timm.create_model(SWIN, num_classes=0, **SWIN_KW).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(UserError, match="unexpected 1: extra.weight"):
        create_classifier(SWIN, num_classes=2, pretrained=str(tmp_path / "extra.safetensors"), **SWIN_KW)
    with pytest.raises(UserError, match="does not exist"):
        create_classifier(SWIN, num_classes=2, pretrained=str(tmp_path / "nope.pt"), **SWIN_KW)
    with pytest.raises(UserError, match="did you mean swin_tiny"):
        create_classifier("swin_tiny_patch4_window7", num_classes=2)
