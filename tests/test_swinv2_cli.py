"""Swin V2 through the entry points, in process and on tiny settings: greenmim-pretrain (exact resume)
-> greenmim-export (loads into timm's swinv2) and greenmim-finetune (fine-tune and k-NN from
the pretraining checkpoint); greenmim-detect with a Swin V2 trunk."""
import json

import pytest
import timm
import torch
from hydra import compose, initialize_config_module

from finetune_helpers import read_jsonl

NAME = "swinv2_tiny_window8_256"
# 64 px: 2x2 units; window 2 with two blocks in stage 1, so it has a shifted block
ARCH = ["model=greenmim_swinv2_micro", "model.encoder_args.embed_dim=16", "model.encoder_args.depths=[2,1,1,1]",
        "model.encoder_args.num_heads=[1,1,2,2]", "model.encoder_args.window_size=2"]


def cfg(task, *overrides):
    with initialize_config_module("greenmim.configs", version_base="1.3"):
        return compose(task, overrides=list(overrides))


def losses(out):
    return {r["step"]: r["train/loss"] for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """3 pretraining steps, and the same run stopped after step 1 and resumed: (checkpoint, losses, resumed losses)."""
    from greenmim.cli.pretrain import run

    root = tmp_path_factory.mktemp("v2")
    args = [*ARCH, "model.decoder_dim=32", "model.decoder_heads=2", "data=synthetic", "data.num_samples=12", "data.img_size=64",
            "data.batch_size=4", "data.num_workers=0", "trainer.epochs=1", "trainer.log_every=1", "trainer.tensorboard=false",
            "vis.every_epochs=0"]
    run(cfg("pretrain", *args, f"output_dir={root / 'full'}"))
    run(cfg("pretrain", *args, f"output_dir={root / 'part'}", "trainer.stop_at_step=1"))
    run(cfg("pretrain", *args, f"output_dir={root / 'part'}", "resume=auto"))
    return root / "full" / "checkpoints" / "step-00000003.pt", losses(root / "full"), losses(root / "part")


def test_pretrain_resumes_exactly_and_exports_to_timm(pretrained, tmp_path, capsys):
    from greenmim.cli.export import main as export_main

    ckpt, full, resumed = pretrained
    assert sorted(full) == [1, 2, 3] and resumed == full
    out = tmp_path / "encoder.safetensors"
    export_main([str(ckpt), "-o", str(out)])
    assert f"timm.create_model('{NAME}', pretrained=True" in capsys.readouterr().out
    info = json.loads((tmp_path / "encoder.safetensors.json").read_text())
    net = timm.create_model(info["timm_name"], pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(file=str(out)), **info["model_args"])
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    for k, v in net.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, state[f"encoder.{k}"]), k


def test_finetune_knn_and_linear_probe_from_the_checkpoint(pretrained, folders, tmp_path):
    from greenmim.cli.finetune import run

    ckpt = pretrained[0]
    common = [*ARCH, f"data.root={folders}", f"pretrained={ckpt}", "data.img_size=64", "data.num_workers=0"]
    res = run(cfg("finetune", "experiment=finetune_quick", *common, f"output_dir={tmp_path / 'ft'}", "data.batch_size=8",
                  "trainer.epochs=1", "trainer.tensorboard=false"))
    report = json.loads((tmp_path / "ft" / "results.json").read_text())["load_report"]
    assert report["kind"] == "greenmim-pretrain" and report["missing"] == ["head.fc.weight", "head.fc.bias"]
    assert "last" in res
    for protocol in ("knn",):  # the linear probe reads the same frozen features
        res = run(cfg("finetune", f"experiment={protocol}", *common, f"output_dir={tmp_path / protocol}", "probe.epochs=1"))
        assert res["protocol"] == protocol and 0.0 <= res["metrics"]["acc1"] <= 100.0


def test_detect_trains_and_evaluates_on_a_swinv2_trunk(tmp_path):
    from greenmim.cli.detect import run

    metrics = run(cfg("detect", "experiment=detect_quick", *ARCH[:4], "model.encoder_args.window_size=4",
                      "data.synthetic.num_train=2", "data.synthetic.num_val=2", "data.synthetic.size=[96,128]",
                      "data.min_size=[96]", "data.max_size=160", "detector.fpn_channels=16", "trainer.max_steps=2",
                      "trainer.tensorboard=false", "sched.warmup_steps=1", f"output_dir={tmp_path}"))
    assert -1.0 <= metrics["bbox_AP"] <= 1.0 and -1.0 <= metrics["segm_AP"] <= 1.0
    trunk = torch.load(tmp_path / "checkpoints" / "step-00000002.pt", map_location="cpu", weights_only=False)["model"]
    assert any("cpb_mlp" in k for k in trunk)
