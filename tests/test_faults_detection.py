"""Detection faults of issues 17 and 18: corrupt training images (skip or a one-line error, no hang
with workers), garbage or wrong-size RLE masks, string ids, detector argument typos and ranges,
experiments composing with data=, paths relative to data.root, the data summary and step-1 lines."""
import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_module

from greenmim.cli import detect as detect_cli
from greenmim.cli.common import to_dict
from greenmim.cli.validate import check_config
from greenmim.tasks.detect import CocoDetection, CocoFormatError
from greenmim.tasks.detect.prepare import prepare_data
from greenmim.tasks.detect.synthetic import write_synthetic_coco
from greenmim.engine.errors import ConfigError, UserError


@pytest.fixture()
def coco(tmp_path):
    """A generated COCO folder (``train/``, ``val/``, ``annotations/instances_{train,val}.json``)."""
    root = tmp_path / "coco"
    write_synthetic_coco(str(root), num_images=4, size=(64, 80), seed=2, split="train")
    write_synthetic_coco(str(root), num_images=2, size=(64, 80), seed=5, split="val")
    return root


def compose_detect(*overrides):
    with initialize_config_module("greenmim.configs", version_base="1.3"):
        return compose("detect", overrides=list(overrides))


def edit_annotations(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def first_rle(data):
    return next(a for a in data["annotations"] if isinstance(a["segmentation"], dict) and not a["iscrowd"])


# -- corrupt training images ---------------------------------------------------------------------
def test_corrupt_training_image_with_workers_exits_2_at_once(coco, tmp_path):
    """data.on_corrupt=error, 2 workers: one error line and exit 2 (it was a traceback, then a hang).
    Also: experiment=detect_quick composes with data=coco, paths given relative to data.root."""
    (coco / "train" / "train_0001.png").write_bytes(b"not a png")
    cmd = [sys.executable, "-m", "greenmim.cli.detect", "experiment=detect_quick", "data=coco", f"data.root={coco}",
           "data.train_images=train", "data.train_ann=annotations/instances_train.json", "data.val_images=val",
           "data.val_ann=annotations/instances_val.json", "data.min_size=[64]", "data.max_size=96",
           "model.encoder_args.depths=[1,1,1,1]", "detector.fpn_channels=16", "data.num_workers=2",
           "data.on_corrupt=error", "data.flip_prob=0", f"output_dir={tmp_path / 'out'}", "trainer.max_steps=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "cannot read image" in err[0] and "train_0001.png" in err[0], err


def test_corrupt_training_image_is_skipped_and_counted(coco):
    (coco / "train" / "train_0000.png").write_bytes(b"not a png")
    ds = CocoDetection(str(coco / "train"), str(coco / "annotations" / "instances_train.json"), flip_prob=0.0)
    image, target = ds[0]  # the next readable image, with its own target
    assert int(target["image_id"]) == ds.ids[1] and ds.files.skipped == 1
    assert tuple(image.shape[1:]) == tuple(target["masks"].shape[1:])
    with pytest.raises(UserError, match="cannot read image .*train_0000.png.*data.on_corrupt=skip"):
        CocoDetection(str(coco / "train"), str(coco / "annotations" / "instances_train.json"), on_corrupt="error")[0]


# -- annotation files ----------------------------------------------------------------------------
@pytest.mark.parametrize("counts,why", [
    ("garbage!!", "not a valid compressed RLE string"),
    ("", "cover 0 pixels"),
    ([5, "a"], "not integers"),
    ([-3, 10], "negative run lengths"),
    ([1, 2, 3], "cover 6 pixels"),
])
def test_garbage_rle_counts_are_skipped_or_one_error(coco, counts, why):
    ann = coco / "annotations" / "instances_train.json"
    edit_annotations(ann, lambda d: first_rle(d)["segmentation"].update(counts=counts))
    rle_id = first_rle(json.loads(ann.read_text()))["id"]
    ds = CocoDetection(str(coco / "train"), str(ann), flip_prob=0.0)
    assert ds.report.bad_annotations == 1 and why in ds.report.examples[0]
    assert all(a["id"] != rle_id for anns in ds.anns.values() for a in anns)
    for i in range(len(ds)):
        ds[i]  # every remaining mask decodes
    with pytest.raises(CocoFormatError, match=f"annotation {rle_id} .*{why}"):
        CocoDetection(str(coco / "train"), str(ann), bad_boxes="error")


def test_rle_of_the_wrong_size_is_not_accepted_silently(coco, caplog):
    ann = coco / "annotations" / "instances_train.json"

    def shrink(data):
        rle = first_rle(data)
        rle["segmentation"] = {"size": [8, 8], "counts": [10, 4, 50]}

    edit_annotations(ann, shrink)
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(str(coco / "train"), str(ann), flip_prob=0.0)
    assert ds.report.bad_annotations == 1 and "does not match the image's [height, width]" in ds.report.examples[0]
    assert "skipped 1 malformed annotations" in caplog.text
    for i in range(len(ds)):
        image, target = ds[i]
        assert tuple(target["masks"].shape[1:]) == tuple(image.shape[1:])


@pytest.mark.parametrize("where", ["images", "annotations", "categories"])
def test_string_ids_are_one_error(coco, where):
    ann = coco / "annotations" / "instances_train.json"

    def stringify(data):
        item = data[where][0]
        item["id"] = f"x{item['id']}"

    edit_annotations(ann, stringify)
    with pytest.raises(CocoFormatError, match=f"{where[:-1]} id 'x.*' is not an integer"):
        CocoDetection(str(coco / "train"), str(ann))


# -- detector arguments --------------------------------------------------------------------------
def test_a_misspelt_maskrcnn_argument_is_refused_with_a_did_you_mean():
    cfg = compose_detect("+detector.maskrcnn.box_detections_per_imgs=5")
    with pytest.raises(ConfigError, match="unknown key detector.maskrcnn.box_detections_per_imgs: did you mean "
                                          "detector.maskrcnn.box_detections_per_img\\?"):
        check_config(cfg, "detect")


@pytest.mark.parametrize("override,message", [
    ("+detector.maskrcnn.box_detections_per_img=-5", "box_detections_per_img=-5 is invalid: set it to an integer >= 1"),
    ("+detector.maskrcnn.box_nms_thresh=1.5", "box_nms_thresh=1.5 is invalid"),
    ("+detector.maskrcnn.rpn_positive_fraction=0", "rpn_positive_fraction=0 is invalid"),
])
def test_detector_values_are_range_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_detect(override), "detect")


def test_the_quick_experiments_arguments_pass():
    check_config(compose_detect("experiment=detect_quick"), "detect")


def test_detector_typo_is_one_line_exit_2_from_the_cli(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["greenmim-detect", "experiment=detect_quick", f"output_dir={tmp_path}/out",
                                      "+detector.maskrcnn.box_detections_per_imgs=5"])
    with pytest.raises(SystemExit) as exit_info:
        detect_cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean detector.maskrcnn.box_detections_per_img?" in err[0]
    assert not (tmp_path / "out").exists()  # refused before anything was written


# -- composition, paths, log lines ---------------------------------------------------------------
def test_an_experiment_composes_with_another_data_option():
    cfg = compose_detect("experiment=detect_quick", "data=coco", "data.root=/data/coco")
    assert cfg.data.name == "coco" and cfg.data.synthetic is None and cfg.data.batch_size == 2
    quick = compose_detect("experiment=detect_quick")
    assert quick.data.name == "coco_synthetic" and quick.data.synthetic.num_train == 32


def test_coco_paths_are_relative_to_data_root(coco, tmp_path):
    cfg = compose_detect("data=coco", f"data.root={coco}", "data.train_images=train",
                         "data.train_ann=annotations/instances_train.json", f"data.val_images={coco / 'val'}",
                         "data.val_ann=annotations/instances_val.json")
    data = prepare_data(to_dict(cfg.data), SimpleNamespace(is_main=True), tmp_path / "out")
    assert data["train_images"] == str(coco / "train") and data["val_images"] == str(coco / "val")
    assert data["train_ann"] == str(coco / "annotations" / "instances_train.json")
    assert data["val_ann"] == str(coco / "annotations" / "instances_val.json")


def test_data_summary_and_step_1_lines(coco, tmp_path, caplog):
    cfg = compose_detect("experiment=detect_quick", "data=coco", f"data.root={coco}", "data.train_images=train",
                         "data.train_ann=annotations/instances_train.json", "data.val_images=val",
                         "data.val_ann=annotations/instances_val.json", "data.min_size=[64]", "data.max_size=96",
                         "model.encoder_args.depths=[1,1,1,1]", "detector.fpn_channels=16", "trainer.max_steps=2",
                         "trainer.log_every=5", "trainer.tensorboard=false", f"output_dir={tmp_path / 'out'}")
    detect_cli.run(cfg)
    log = (tmp_path / "out" / "train.log").read_text()
    summary = next(line for line in log.splitlines() if "data: train" in line)
    assert "train instances_train.json: 4 images, " in summary and " annotations, 3 categories" in summary
    assert "| val instances_val.json: 2 images" in summary
    # the next line is the last step's (2), not trainer.log_every's 5, which a 2-step run never reaches
    assert "step 1/2 | loss " in log and "next progress line at step 2" in log
