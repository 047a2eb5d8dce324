"""greenmim-export: the encoder alone, in timm's layout, loads into timm (pretrained=True and load_state_dict)."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import yaml_node
from greenmim.cli.export import main as export_main
from greenmim.engine import OptimConfig, Trainer, TrainerConfig
from greenmim.tasks.pretrain.task import PretrainTask

ENCODER_ARGS = dict(embed_dim=16, window_size=4, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], drop_path_rate=0.1)


@pytest.fixture(scope="module", params=["greenmim", "simmim"])
def checkpoint(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    model_cfg = yaml_node("pretrain", "model", name="swin_tiny_patch4_window7_224", method=request.param, decoder_dim=32, decoder_heads=2,
                          encoder_args=ENCODER_ARGS)
    data_cfg = yaml_node("pretrain", "data", "data=synthetic", img_size=64, batch_size=2, num_workers=0, num_samples=4)
    config = {"model": model_cfg, "data": data_cfg}
    trainer = Trainer(PretrainTask(model_cfg, data_cfg, 0), TrainerConfig.from_yaml(output_dir=str(out), max_steps=1, tensorboard=False, config=config),
                      OptimConfig.from_yaml(lr=1e-3), {"name": "cosine", "warmup_epochs": 0})
    trainer.fit()
    return trainer.last_checkpoint, trainer.model


def test_export_loads_into_timm(checkpoint, tmp_path, capsys):
    ckpt, model = checkpoint
    out = tmp_path / "encoder.safetensors"
    export_main([str(ckpt), "-o", str(out)])
    printed = capsys.readouterr().out
    assert "timm.create_model('swin_tiny_patch4_window7_224', pretrained=True" in printed
    info = json.loads((tmp_path / "encoder.safetensors.json").read_text())
    args = info["model_args"]
    assert args == {"embed_dim": 16, "window_size": 4, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "img_size": 64}

    # 1) timm's pretrained path, with a class count other than the pretrained config's 1000
    net = timm.create_model(info["timm_name"], pretrained=True, num_classes=7, pretrained_cfg_overlay=dict(file=str(out)), **args)
    state = load_file(str(out))
    assert not any(k.startswith("head") for k in state)
    for k, v in state.items():
        assert torch.equal(net.state_dict()[k], v), k
    # 2) plain load_state_dict: only the head is missing
    net2 = timm.create_model(info["timm_name"], pretrained=False, num_classes=7, **args)
    result = net2.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["head.fc.bias", "head.fc.weight"] and not result.unexpected_keys
    # the exported encoder computes what the pretrained encoder computed (all units visible)
    x = torch.randn(2, 3, 64, 64)
    enc = model.encoder.eval()
    mask = torch.zeros(2, 4, dtype=torch.bool)
    ref = enc(x, mask) if enc.visible_only else enc(x, mask, model.enc_mask_token)
    net.eval()
    feats = net.forward_features(x).reshape(2, 4, -1)
    torch.testing.assert_close(feats, ref, rtol=1e-4, atol=1e-4)


def test_export_rejects_foreign_files(tmp_path, capsys):
    bad = tmp_path / "x.pt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(SystemExit) as exc:
        export_main([str(bad)])
    assert exc.value.code == 2
    assert "not a greenmim training checkpoint" in capsys.readouterr().err
