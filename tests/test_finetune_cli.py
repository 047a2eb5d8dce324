"""greenmim-finetune end to end: CLI fine-tune + eval-only on generated class folders and on hymenoptera,
exact resume (with EMA), and the data errors users see."""
import json
import os
import subprocess
import sys

import pytest
from finetune_helpers import TINY, compose, read_jsonl

def cli(*args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "greenmim.cli.finetune", *args], capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def quick_args(root, out, *extra):
    return ["experiment=finetune_quick", f"data.root={root}", f"output_dir={out}", "data.img_size=64", "data.batch_size=6",
            "data.num_workers=0", "trainer.log_every=1", TINY, *extra]


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
