"""greenmim-pretrain end to end (subprocess) on generated images and real photos; resume; visualize;
one-line errors for bad input."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_PRETRAIN_ARGS as TINY
from greenmim.engine import load_checkpoint


def pretrain(*args, timeout=240):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "greenmim.cli.pretrain", *TINY, *args], capture_output=True, text=True, timeout=timeout, env=env)
    return proc


def train_losses(out: Path):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    """17 generated photos-like images in nested folders (RGB JPEG/PNG, grey, palette) and one corrupt file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(16):
        h, w = rng.integers(70, 140, size=2)
        yy, xx = np.mgrid[0:h, 0:w]
        pix = np.stack([(xx * (i + 1)) % 256, (yy * 3 + i * 20) % 256, ((xx + yy) * 2) % 256], -1).astype(np.uint8)
        img = Image.fromarray(pix)
        sub = root / f"set{i % 3}" / ("deeper" if i % 5 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        if i == 3:
            img = img.convert("L")
        if i == 4:
            img = img.convert("P")
        img.save(sub / f"img{i}.{'png' if i % 2 else 'jpg'}" if i != 4 else sub / f"img{i}.gif")
    (root / "set1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


@pytest.fixture(scope="module")
def folder_run(image_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    proc = pretrain("data=folder", f"data.root={image_tree}", "data.num_workers=2", "trainer.epochs=2", f"output_dir={out}")
    return out, proc


def test_end_to_end_on_generated_images(folder_run):
    out, proc = folder_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert re.search(r"epoch \d: skipped 1 unreadable image\(s\), e\.g\. \S*broken\.jpg", log)  # one total per epoch
    assert re.search(r"converted \d+ image\(s\) to RGB: .*(P \(palette\)|L \(greyscale\))", log)
    # 17 files (one unreadable, replaced by the next) -> 4 batches of 4 per epoch, 2 epochs
    assert sorted(train_losses(out)) == list(range(1, 9))
    assert (out / "checkpoints" / "step-00000008.pt").is_file()
    assert (out / "config.yaml").is_file() and "greenmim_swin_micro" not in (out / "config.yaml").read_text()
    assert "swin_tiny_patch4_window7_224" in (out / "config.yaml").read_text()
    assert "epoch 2/2 step 8/8 | loss" in (out / "train.log").read_text()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    pngs = sorted(p.name for p in (out / "reconstructions").glob("*.png"))
    assert pngs == ["epoch_0001.png", "epoch_0002.png"]
    img = Image.open(out / "reconstructions" / "epoch_0002.png")
    assert img.mode == "RGB" and img.size[0] > 3 * 64
    ckpt = load_checkpoint(out / "checkpoints" / "step-00000008.pt")
    assert {"model", "optimizer", "scaler", "rank_states", "config"} <= set(ckpt) and "schedule" not in ckpt
    assert any(k.startswith("decoder.") for k in ckpt["model"]) and any(k.startswith("encoder.") for k in ckpt["model"])
    assert ckpt["epoch"] == 2


def test_stopped_run_resumes_with_identical_losses(folder_run, image_tree, tmp_path):
    out, proc = folder_run
    assert proc.returncode == 0
    common = ("data=folder", f"data.root={image_tree}", "data.num_workers=2", "trainer.epochs=2", f"output_dir={tmp_path}")
    first = pretrain(*common, "trainer.stop_at_step=3")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "stopping at step 3" in first.stdout
    second = pretrain(*common, "resume=auto")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout and "step-00000003.pt" in second.stdout
    assert train_losses(tmp_path) == train_losses(out)


def test_visualize_renders_given_images(folder_run, image_tree, tmp_path, capsys):
    from greenmim.cli.visualize import main

    out, _ = folder_run
    png = tmp_path / "vis.png"
    main([str(out / "checkpoints" / "step-00000008.pt"), str(image_tree / "set0"), str(image_tree / "set2" / "img2.jpg"), "-o", str(png), "--max-images", "3"])
    assert "wrote" in capsys.readouterr().out
    img = Image.open(png)
    assert img.size[1] > 3 * 128  # three rows of (upscaled) 64 px cells


def test_end_to_end_on_real_photos(hymenoptera, tmp_path):
    proc = pretrain("data=imagefolder", f"data.root={hymenoptera}", "data.num_workers=2", "trainer.max_steps=3", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "245 images" in proc.stdout
    assert (tmp_path / "checkpoints" / "step-00000003.pt").is_file()
    assert (tmp_path / "reconstructions" / "epoch_0001.png").is_file()


# ------------------------------------------------------------------------------------------ bad input
def run_main(monkeypatch, capsys, *args):
    """Run the console entry point in-process; returns (exit code, stderr)."""
    from greenmim.cli.pretrain import main

    monkeypatch.setattr(sys, "argv", ["greenmim-pretrain", *TINY, "data.num_workers=0", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (("trainer.epoch=3",), r"unknown config key 'trainer.epoch': did you mean trainer.epochs\?"),
        (("model=greenmim_swin_bsae_w7",), r"unknown model=greenmim_swin_bsae_w7: did you mean model=greenmim_swin_base_w7\?"),
        (("model.name=swin_bsae_patch4_window7_224",), r"unknown model 'swin_bsae_patch4_window7_224': did you mean swin_base_patch4_window7_224"),
        (("data.img_size=100",), r"image size 100x100 is not a multiple of the mask unit \(32 px.*data.img_size"),
        (("data=folder", "data.root=/no/such/folder"), r"data.root=/no/such/folder does not exist"),
        (("data=imagefolder",), r"data.root is not set: pass data.root="),
        (("trainer.precision=bf61",), r"trainer.precision must be one of bf16, fp16, fp32, got 'bf61'"),
        (("resume=/no/such/ckpt.pt",), r"resume=/no/such/ckpt.pt: no such file"),
        (("experiment=finetune_quick",), r"a finetune recipe, not a pretrain one: run it with greenmim-finetune"),
    ],
)
def test_bad_input_gives_one_line_error(monkeypatch, capsys, tmp_path, args, message):
    code, err = run_main(monkeypatch, capsys, f"output_dir={tmp_path}", *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("greenmim-pretrain: error: ")
    import re

    assert re.search(message, lines[0]), lines[0]


def test_empty_folder_and_corrupt_image_policy(monkeypatch, capsys, tmp_path, image_tree):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    code, err = run_main(monkeypatch, capsys, f"output_dir={tmp_path}/o1", "data=folder", f"data.root={tmp_path / 'empty'}")
    assert code == 2 and "no images" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(4):
        (bad / f"b{i}.jpg").write_bytes(b"not an image")
    code, err = run_main(monkeypatch, capsys, f"output_dir={tmp_path}/o2", "data=folder", f"data.root={bad}", "data.on_corrupt=error")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot read image" in err and "data.on_corrupt=skip" in err
