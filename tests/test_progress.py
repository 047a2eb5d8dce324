"""Progress where work takes more than a few seconds (issue 22, item 5): one helper (a tqdm bar on a
terminal, a log line every few seconds otherwise) for feature extraction, visualization and detection
evaluation; start-up lines; one end-of-epoch total of skipped and converted images across loader
workers; pycocotools' AP tables in train.log only."""
import logging
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import greenmim.engine.progress as progress_mod
from finetune_helpers import TINY, compose
from greenmim.engine.progress import progress

PRETRAIN_TINY = [
    "model=greenmim_swin_micro", "model.encoder_args.embed_dim=16", "model.encoder_args.depths=[1,1,1,1]",
    "model.encoder_args.num_heads=[1,1,2,2]", "model.decoder_dim=32", "model.decoder_heads=2",
    "data.img_size=64", "data.batch_size=4", "trainer.log_every=2", "trainer.tensorboard=false", "vis.every_epochs=0",
]


class Records(logging.Handler):
    """The messages of the ``greenmim`` logger while installed."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def lines(monkeypatch):
    """Progress as in a log file (not a terminal), a line after every item; the ``greenmim`` messages."""
    monkeypatch.setattr(progress_mod, "LOG_EVERY_S", 0.0)
    monkeypatch.setattr(progress_mod, "interactive", lambda: False)
    logger = logging.getLogger("greenmim")
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_progress_is_a_log_line_off_a_terminal_and_a_bar_on_one(lines, monkeypatch, capsys):
    assert list(progress(range(4), "work")) == [0, 1, 2, 3]
    assert [re.sub(r", \d+ s, eta .*", "", ln) for ln in lines] == [f"work: {i}/4 batches ({25 * i}%)" for i in (1, 2, 3)]
    assert list(progress(iter(range(2)), "counted", unit="images")) == [0, 1]
    assert [re.sub(r", \d+ s$", "", ln) for ln in lines[-2:]] == ["counted: 1 images", "counted: 2 images"]  # no total: counts
    lines.clear()
    assert list(progress(range(3), "elsewhere", enabled=False)) == [0, 1, 2] and not lines
    monkeypatch.setattr(progress_mod, "interactive", lambda: True)
    assert list(progress(range(3), "on a terminal")) == [0, 1, 2]
    assert not lines and "on a terminal" in capsys.readouterr().err  # tqdm's bar, on stderr


def test_frozen_feature_extraction_shows_progress_and_one_conversion_total(folders, lines, tmp_path):
    """k-NN; the linear probe extracts its features with the same function."""
    from greenmim.cli.finetune import run

    run(compose("experiment=knn", f"data.root={folders}", f"output_dir={tmp_path}", "pretrained=null", "data.img_size=64",
                "data.batch_size=5", "data.num_workers=0", TINY))
    log = (tmp_path / "train.log").read_text()  # the run sets up its own logging
    assert "features of 19 train images: 1/4 batches (25%)" in log and "features of 12 val images: 2/3 batches (67%)" in log
    assert [ln.split(": ", 1)[1] for ln in log.splitlines() if "to RGB" in ln] == [
        "features: converted 1 image(s) to RGB: 1 P (palette)"]  # the GIF of train


def test_detection_evaluation_shows_progress(lines, tmp_path):
    from greenmim.tasks.detect import CocoDetection
    from greenmim.tasks.detect.synthetic import write_synthetic_coco
    from greenmim.tasks.detect.task import evaluate_coco
    from greenmim.engine.distributed import DistInfo

    class Nothing(nn.Module):
        def forward(self, images):
            return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)} for _ in images]

    ds = CocoDetection(*write_synthetic_coco(str(tmp_path), num_images=3, size=(64, 64), seed=0), train=False, filter_empty=False)
    evaluate_coco(Nothing(), ds, torch.device("cpu"), DistInfo())
    assert [ln.split(",")[0] for ln in lines if ln.startswith("COCO evaluation")] == [
        "COCO evaluation of 3 images: 1/3 batches (33%)", "COCO evaluation of 3 images: 2/3 batches (67%)"]


def test_coco_ap_tables_go_to_the_log_file_only(tmp_path, capsys):
    from greenmim.tasks.detect import CocoDetection, CocoEvaluator, ground_truth_as_predictions
    from greenmim.tasks.detect.synthetic import write_synthetic_coco
    from greenmim.engine import setup_logging

    ds = CocoDetection(*write_synthetic_coco(str(tmp_path / "coco"), num_images=3, size=(64, 64), seed=0), train=False,
                       filter_empty=False)
    setup_logging(tmp_path / "run")
    ev = CocoEvaluator(ds.coco, ds.label_to_cat)
    for i in range(len(ds)):
        ev.update([ground_truth_as_predictions(ds, i)], [ds.ids[i]])
    assert ev.evaluate()["bbox_AP"] == pytest.approx(1.0)
    logging.getLogger("greenmim").handlers[-1].flush()
    assert "Average Precision" not in capsys.readouterr().out
    text = (tmp_path / "run" / "train.log").read_text()
    assert all(f"COCO {t} on 3 images:\n Average Precision  (AP) @[ IoU=0.50:0.95" in text for t in ("bbox", "segm"))


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """8 images (a multiple of the batch: every one is read each epoch): RGB JPEGs, a palette GIF, a
    greyscale PNG and a corrupt JPEG (sorted first, so its replacement is the RGB a0.jpg)."""
    root = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(root / f"a{i}.jpg")
    rgb = Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8))
    rgb.convert("P").save(root / "palette.gif")
    rgb.convert("L").save(root / "grey.png")
    (root / "a.broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


@pytest.fixture(scope="module")
def odd_run(odd_images, tmp_path_factory):
    """A tiny 2-epoch pretraining on ``odd_images`` with 2 loader workers; its output_dir."""
    from greenmim.cli.pretrain import main

    out = tmp_path_factory.mktemp("run") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["greenmim-pretrain", *PRETRAIN_TINY, "data=folder", f"data.root={odd_images}",
                                 "data.num_workers=2", "trainer.epochs=2", f"output_dir={out}"])
        try:
            main()
        except SystemExit as exc:
            assert exc.code in (0, None)
    return out


def test_start_up_lines_and_one_image_total_per_epoch(odd_run, odd_images):
    log = (odd_run / "train.log").read_text()
    messages = [ln.split(": ", 1)[1] for ln in log.splitlines() if "greenmim" in ln and ": " in ln]
    start = [i for i, m in enumerate(messages) if m in ("building the model...", "building the data loader...")]
    assert len(start) == 2
    assert f"indexing images under {odd_images}..." in messages and any(m.startswith(f"8 images under {odd_images} (") for m in messages)
    totals = [m for m in messages if "unreadable" in m or "RGB" in m]
    assert totals == [f"epoch {e}: skipped 1 unreadable image(s), e.g. {odd_images / 'a.broken.jpg'} (data.on_corrupt=error "
                      "stops at the first instead); converted 2 image(s) to RGB: 1 P (palette), 1 L (greyscale)" for e in (1, 2)]


def test_visualize_shows_what_it_does(odd_run, odd_images, lines, tmp_path, capsys):
    from greenmim.cli.visualize import main

    ckpt = sorted((odd_run / "checkpoints").glob("step-*.pt"))[-1]
    main([str(ckpt), *(str(odd_images / f"a{i}.jpg") for i in range(3)), "-o", str(tmp_path / "grid.png")])
    out = capsys.readouterr().out
    for expected in (f"reading {ckpt}...", "building the model (swin_tiny_patch4_window7_224, 64 px)...",
                     "reading 3 images: 2/3 images (67%)", "reconstructing 3 images at mask ratio 0.75...", "wrote "):
        assert expected in out, out
