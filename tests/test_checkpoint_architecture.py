"""Issue 22.2-3: ``pretrained=`` and ``resume=`` carry the architecture (a greenmim checkpoint's stored
config, an export's description, an official GreenMIM checkpoint's weights), a real mismatch names
the keys, and official GreenMIM checkpoints export and load (the fixture in ../shared, where present)."""
import functools
import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from safetensors.torch import load_file

from cli_helpers import assert_one_line, run_cli
from greenmim.cli.architecture import adopt_checkpoint_architecture
from greenmim.cli.export import export_encoder
from greenmim.tasks.detect.backbone import TimmTrunk
from greenmim.tasks.frozen_eval.run import build_frozen_encoder
from greenmim.models.registry import create_encoder
from greenmim.weights.architecture import read_architecture

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official_greenmim"
# a micro Swin that is not any experiment's default: embed 16, depths 1-1-2-1, window 2
PRETRAIN = [
    "experiment=quickstart", "model.encoder_args.embed_dim=16", "model.encoder_args.depths=[1,1,2,1]",
    "model.encoder_args.num_heads=[1,2,2,4]", "model.encoder_args.window_size=2", "model.decoder_dim=32",
    "model.decoder_heads=2", "model.method=simmim", "data.img_size=64", "data.batch_size=4", "data.num_samples=8",
    "data.num_workers=0", "trainer.tensorboard=false", "vis.every_epochs=0",
]
ARCH = {"embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 2, 4], "window_size": 2}


@pytest.fixture(scope="module")
def official():
    if not (OFFICIAL / "checkpoint-0.pth").is_file():
        pytest.skip("../shared/fixtures/official_greenmim is absent")
    return OFFICIAL


def run_ok(module, prog, *args):
    """Run ``greenmim.cli.<module>.main`` in-process with ``argv = [prog, *args]``; it must succeed."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [prog, *args])
        try:
            importlib.import_module(f"greenmim.cli.{module}").main()
        except SystemExit as exc:
            assert exc.code in (0, None), f"{prog} exited with {exc.code}"


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    """A 2-step simmim pretraining run of the micro Swin above (its checkpoint stores the config)."""
    out = tmp_path_factory.mktemp("pre") / "run"
    run_ok("pretrain", "greenmim-pretrain", *PRETRAIN, "trainer.max_steps=2", f"output_dir={out}")
    return out


def last_checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*.pt"))[-1]


def composed(name, *overrides):
    with initialize_config_module("greenmim.configs", version_base="1.3"):
        return compose(name, overrides=list(overrides))


def encoder_args(cfg):
    return {k: (list(v) if not isinstance(v, int) else v) for k, v in cfg.model.encoder_args.items() if k in ARCH}


# ------------------------------------------------------------------ sources
def test_each_source_tells_the_architecture(pretrain_run, tmp_path):
    ckpt = last_checkpoint(pretrain_run)
    stored = read_architecture(str(ckpt))
    assert (stored.source, stored.name, stored.method, stored.img_size) == ("stored config", "swin_tiny_patch4_window7_224", "simmim", 64)
    assert {k: stored.encoder_args[k] for k in ARCH} == ARCH
    out, _ = export_encoder(str(ckpt), str(tmp_path / "enc.safetensors"))
    described = read_architecture(str(out))
    assert described.source == "export description" and {k: described.encoder_args[k] for k in ARCH} == ARCH
    # without the sidecar: the safetensors metadata; from the weights alone: the same architecture
    (tmp_path / "enc.safetensors.json").unlink()
    assert read_architecture(str(out)).source == "export description"
    weights = read_architecture("x.pt", {"model": load_file(str(out))})
    assert weights.source == "weights" and {k: weights.encoder_args[k] for k in ARCH} == ARCH


def test_finetune_takes_the_architecture_of_a_pretraining_checkpoint(pretrain_run, folders, tmp_path, capsys):
    """No model= and no model.encoder_args: the quick recipe's default micro Swin (embed 32) is replaced
    (an export's description: the next test)."""
    out = tmp_path / "ft"
    run_ok("finetune", "greenmim-finetune", "experiment=finetune_quick", f"data.root={folders}",
           f"pretrained={last_checkpoint(pretrain_run)}", "data.img_size=64", "data.batch_size=4", "data.num_workers=0",
           "trainer.max_steps=1", "trainer.tensorboard=false", f"output_dir={out}")
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert {k: written["model"]["encoder_args"][k] for k in ARCH} == ARCH
    assert "drop_path_rate" not in written["model"]["encoder_args"]  # the fine-tuning recipe's own
    assert re.search(r"pretrained: loaded \d+ tensors", (out / "train.log").read_text())
    # eval_only carries the architecture of the checkpoint it evaluates (the recipe's default is embed 32)
    ckpt = last_checkpoint(out)
    quick = ["experiment=finetune_quick", f"data.root={folders}", "data.img_size=64", "data.num_workers=0",
             "trainer.tensorboard=false", "eval_only=true", f"checkpoint={ckpt}"]
    run_ok("finetune", "greenmim-finetune", *quick, f"output_dir={tmp_path / 'ev'}")
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["count"] > 0
    with pytest.MonkeyPatch.context() as mp:
        code, err = run_cli(mp, capsys, "finetune", "greenmim-finetune", *quick, "model.encoder_args.embed_dim=32",
                            f"output_dir={tmp_path / 'ev2'}")
    assert_one_line(code, err, "greenmim-finetune", r"checkpoint=.* holds a model of another architecture "
                                                    r"\(model.encoder_args.embed_dim: checkpoint 16, this command 32\).*eval_only takes")


def test_knn_probe_and_detection_take_the_architecture_of_an_export(pretrain_run, tmp_path):
    export, _ = export_encoder(str(last_checkpoint(pretrain_run)), str(tmp_path / "enc.safetensors"))
    cfg = composed("finetune", "experiment=knn", f"pretrained={export}", "data.img_size=64")
    adopt_checkpoint_architecture(cfg, "finetune")
    assert encoder_args(cfg) == ARCH
    model, report = build_frozen_encoder(cfg, 3)
    assert report.kind == "safetensors" and report.loaded == 80 and all(k.startswith("head.") for k in report.missing)
    det = composed("detect", "experiment=detect_quick", f"pretrained={export}")
    adopt_checkpoint_architecture(det, "detect")
    assert encoder_args(det) == ARCH
    trunk = TimmTrunk(det.model.name, pretrained=str(export), **encoder_args(det))
    assert trunk.channels == [16, 32, 64, 128] and all(k.startswith("head.") for k in trunk.load_report.missing)


def test_a_model_choice_that_does_not_fit_the_checkpoint_names_the_keys(pretrain_run, folders, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ft"
    code, err = run_cli(monkeypatch, capsys, "finetune", "greenmim-finetune", "experiment=finetune_quick", f"data.root={folders}",
                        f"pretrained={last_checkpoint(pretrain_run)}", "model.encoder_args.embed_dim=32", f"output_dir={out}")
    assert_one_line(code, err, "greenmim-finetune", r"pretrained=.* holds a swin_tiny_patch4_window7_224\(.*embed_dim=16.*\) at 64 px \(from its "
                                                    r"stored config\).*model.encoder_args.embed_dim: checkpoint 16, this run 32.*drop model=")
    assert not out.exists()


# ------------------------------------------------------------------ resume
def test_resume_takes_the_model_of_its_checkpoint_and_names_a_real_mismatch(pretrain_run, tmp_path, monkeypatch, capsys):
    """The run was pretrained with model.method=simmim and another architecture than the quickstart's:
    a resume without them continues it; one that sets model.method=greenmim is refused naming the key."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pretrain_run, run)
    run_ok("pretrain", "greenmim-pretrain", "experiment=quickstart", "data.num_samples=8", "data.num_workers=0",
           "trainer.tensorboard=false", "vis.every_epochs=0", "trainer.max_steps=3", f"output_dir={run}", "resume=auto",
           "data.batch_size=4")
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["model"]["method"] == "simmim" and written["data"]["img_size"] == 64
    assert {k: written["model"]["encoder_args"][k] for k in ARCH} == ARCH
    assert last_checkpoint(run).name == "step-00000003.pt"
    code, err = run_cli(monkeypatch, capsys, "pretrain", "greenmim-pretrain", *PRETRAIN, "model.method=greenmim", "trainer.max_steps=4",
                        f"output_dir={run}", "resume=auto")
    assert_one_line(code, err, "greenmim-pretrain", r"resume=.*step-00000003.pt continues a run with another model "
                                                    r"\(model.method: checkpoint simmim, this command greenmim\): drop these overrides")


# ------------------------------------------------------------------ official GreenMIM checkpoints
def test_official_checkpoint_exports_to_an_encoder_that_reproduces_the_reference(official, tmp_path):
    out, info = export_encoder(str(official / "checkpoint-0.pth"), str(tmp_path / "official.safetensors"))
    assert info["model_args"] == {"patch_size": 4, "embed_dim": 16, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8],
                                  "window_size": 7, "img_size": 224}
    assert json.loads((tmp_path / "official.safetensors.json").read_text())["method"] == "greenmim"
    ref = torch.load(official / "reference.pt", map_location="cpu")
    encoder = create_encoder(info["timm_name"], **info["model_args"]).eval()
    result = encoder.load_state_dict(load_file(str(out)), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        feats = encoder(ref["images"], ref["mask"])  # visible units, ascending raster order
    assert feats.shape == ref["encoder_output"].shape
    assert (feats - ref["encoder_output"]).abs().max() < 1e-4  # timm's LayerNorm eps 1e-5, the reference's 1e-6
    # with the reference's eps the conversion is exact to float rounding
    exact = create_encoder(info["timm_name"], norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), **info["model_args"]).eval()
    exact.load_state_dict(load_file(str(out)), strict=False)
    with torch.no_grad():
        assert (exact(ref["images"], ref["mask"]) - ref["encoder_output"]).abs().max() < 1e-5


def test_official_checkpoint_is_a_pretrained_source_for_finetune_frozen_eval_and_detection(official, folders, tmp_path):
    path = official / "checkpoint-0.pth"
    out = tmp_path / "ft"
    run_ok("finetune", "greenmim-finetune", "experiment=finetune_quick", f"data.root={folders}", f"pretrained={path}",
           "data.img_size=64", "data.batch_size=4", "data.num_workers=0", "trainer.max_steps=1", "trainer.tensorboard=false",
           f"output_dir={out}")
    log = (out / "train.log").read_text()
    assert re.search(r"loaded \d+ tensors from checkpoint-0.pth \(official-greenmim-pretrain\); missing \(re-initialised\): "
                     r"head.fc.weight, head.fc.bias; .*ignored 20 pretraining-only tensors", log)
    assert not re.search(r"resized: [^;]*downsample", log)  # the patch merging is renumbered, not resized
    cfg = composed("finetune", "experiment=linear_probe", f"pretrained={path}", "data.img_size=64")
    adopt_checkpoint_architecture(cfg, "finetune")
    assert encoder_args(cfg) == {"embed_dim": 16, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8], "window_size": 7}
    model, report = build_frozen_encoder(cfg, 3)
    assert report.kind == "official-greenmim-pretrain" and report.head_dropped == []
    det = composed("detect", "experiment=detect_quick", f"pretrained={path}")
    adopt_checkpoint_architecture(det, "detect")
    trunk = TimmTrunk(det.model.name, pretrained=str(path), **encoder_args(det))
    assert trunk.load_report.kind == "official-greenmim-pretrain" and all(k.startswith("head.") for k in trunk.load_report.missing)
