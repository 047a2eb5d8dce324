"""greenmim-finetune end to end: CLI fine-tune + eval-only on generated class folders and on hymenoptera,
exact resume (with EMA), and the data errors users see."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from greenmim.models import create_pretrain_model

TINY = "model.encoder_args={embed_dim:16,depths:[1,1,1,1],num_heads:[1,1,2,2],window_size:2}"
TINY_KW = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2)
COLORS = [(200, 40, 40), (40, 40, 200), (40, 170, 40)]


def make_folders(root: Path, per_class=(6, 4), size=(40, 52), seed=0) -> Path:
    """3 classes of noisy solid colours: root/{train,val}/class{i}/*.jpg, plus one palette GIF in train."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for c, color in enumerate(COLORS):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = (np.array(color)[None, None] + rng.normal(0, 30, (*size, 3))).clip(0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i}.jpg")
    Image.fromarray(np.full((30, 30, 3), COLORS[0], np.uint8)).convert("P").save(root / "train" / "class0" / "palette.gif")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_folders(tmp_path_factory.mktemp("cls"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A greenmim pretraining checkpoint in the trainer's layout (encoder.*, decoder.*)."""
    torch.manual_seed(0)
    model = create_pretrain_model("swin_tiny_patch4_window7_224", img_size=64, decoder_dim=32, decoder_heads=2, **TINY_KW)
    path = tmp_path_factory.mktemp("pre") / "pretrain.pt"
    torch.save({"format": "greenmim-checkpoint", "version": 1, "model": model.state_dict(), "epoch": 1, "step": 1}, path)
    return path


def cli(*args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "greenmim.cli.finetune", *args], capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def quick_args(root, out, *extra):
    return ["experiment=finetune_quick", f"data.root={root}", f"output_dir={out}", "data.img_size=64", "data.batch_size=6",
            "data.num_workers=0", "trainer.log_every=1", TINY, *extra]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_cli_finetune_then_eval_only_reproduces_accuracy(folders, pretrained, tmp_path):
    out = tmp_path / "run"
    cli(*quick_args(folders, out, f"pretrained={pretrained}", "trainer.epochs=2", "optim.blr=0.05"))
    results = json.loads((out / "results.json").read_text())
    assert results["load_report"]["kind"] == "greenmim-pretrain"
    assert results["load_report"]["missing"] == ["head.fc.weight", "head.fc.bias"]
    assert results["num_classes"] == 3 and results["train_images"] == 19 and results["val_images"] == 12
    rows = read_jsonl(out / "metrics.jsonl")
    epochs = [r for r in rows if "epoch/val_acc1" in r]
    assert len(epochs) == 2 and all("train/img_per_s" in r for r in rows if "train/loss" in r)
    assert (out / "checkpoints" / "best.pt").is_file() and list((out / "checkpoints").glob("step-*.pt"))
    assert list((out / "tb").iterdir())

    cli(*quick_args(folders, out, "eval_only=true"))
    ev = json.loads((out / "eval.json").read_text())
    best = results["best"]
    assert ev["count"] == 12
    assert ev["acc1"] == pytest.approx(best["acc1"]) and ev["loss"] == pytest.approx(best["loss"], rel=1e-5)


def test_cli_reports_bad_data_in_one_line(folders, tmp_path):
    proc = cli(*quick_args(folders, tmp_path / "x", "data.num_classes=5"), check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "data.num_classes=5 but" in err[0] and "set data.num_classes=3" in err[0]


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("greenmim.configs", version_base="1.3"):
        return hydra_compose("finetune", overrides=list(overrides))


def test_resume_reproduces_uninterrupted_run_with_ema(folders, pretrained, tmp_path):
    from greenmim.cli.finetune import run

    # 19 train images / batch 8 = 2 steps per epoch; 2 epochs; EMA on; interrupted after the first step of epoch 2
    args = [f"pretrained={pretrained}", "data.batch_size=8", "trainer.epochs=2", "ema.enabled=true", "ema.decay=0.5",
            "trainer.tensorboard=false"]
    full = run(compose(*quick_args(folders, tmp_path / "full", *args)))
    run(compose(*quick_args(folders, tmp_path / "split", *args, "trainer.stop_at_step=3")))
    resumed = run(compose(*quick_args(folders, tmp_path / "split", *args, "resume=auto")))
    assert resumed["last"] == pytest.approx(full["last"], rel=1e-6)
    assert resumed["best"] == pytest.approx(full["best"], rel=1e-6)
    assert "ema_val_acc1" in full["last"]

    def losses(run_dir):
        return {r["step"]: r["train/loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r}

    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "full"), rel=1e-6)
    assert sorted(losses(tmp_path / "full")) == [1, 2, 3, 4]


def test_hymenoptera_finetune_reports_accuracy(hymenoptera, pretrained, tmp_path, record_property):
    """Real photos (ants/bees, JPEG + a palette GIF): a few steps of the tiny model, evaluated on all 153 val images."""
    out = tmp_path / "hym"
    cli(*quick_args(hymenoptera, out, f"pretrained={pretrained}", "trainer.max_steps=4", "data.batch_size=16", "optim.blr=0.02"))
    results = json.loads((out / "results.json").read_text())
    assert results["num_classes"] == 2 and results["train_images"] == 245 and results["val_images"] == 153
    acc = results["last"]["val_acc1"]
    assert 0.0 <= acc <= 100.0
    record_property("hymenoptera_val_acc1", acc)
    print(f"hymenoptera (tiny Swin, 4 steps): val top-1 {acc:.2f}%")
