"""Pretraining data: datasets, RGB conversion, corrupt files, clear errors for bad folders and sizes."""
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import yaml_node
from greenmim.data import (
    CorruptImageError,
    DataError,
    ImageFiles,
    SyntheticImages,
    build_pretrain_dataset,
    build_train_loader,
    list_folder,
    list_imagefolder,
    load_rgb,
    pretrain_transform,
)
from greenmim.engine import ConfigError, DistInfo
from greenmim.engine.image_counts import CountReport
from greenmim.tasks.pretrain.task import build_pretrain_model

MICRO = dict(name="swin_tiny_patch4_window7_224", method="greenmim", decoder_dim=32, decoder_heads=2,
             encoder_args=dict(embed_dim=16, window_size=4, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2]))


def write_odd_images(folder: Path) -> dict:
    """One image per awkward kind: RGB JPEG, greyscale, palette with transparency, RGBA, 16-bit grey, corrupt."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    files = {
        "rgb": folder / "a" / "rgb.jpg",
        "grey": folder / "a" / "grey.png",
        "palette": folder / "b" / "palette.gif",
        "rgba": folder / "b" / "deep" / "rgba.png",
        "grey16": folder / "grey16.png",
        "corrupt": folder / "b" / "corrupt.jpg",
    }
    for p in files.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    rgb.save(files["rgb"])
    rgb.convert("L").save(files["grey"])
    pal = rgb.convert("P")
    pal.info["transparency"] = 0
    pal.save(files["palette"], transparency=0)
    rgb.convert("RGBA").save(files["rgba"])
    Image.fromarray((rng.integers(0, 65535, (40, 50))).astype(np.uint16)).save(files["grey16"])
    files["corrupt"].write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return files


def test_every_mode_becomes_rgb_and_corrupt_files_raise(tmp_path, caplog):
    files = write_odd_images(tmp_path)
    with caplog.at_level(logging.WARNING, logger="greenmim"):
        for kind in ("rgb", "grey", "palette", "rgba", "grey16"):
            img = load_rgb(str(files[kind]))
            assert img.mode == "RGB" and img.size == (50, 40), kind
    assert "converting P (palette)" in caplog.text and "each mode is reported once" in caplog.text
    with pytest.raises(CorruptImageError, match=r"cannot read image .*corrupt\.jpg .*remove or replace the file$"):
        load_rgb(str(files["corrupt"]))  # no data.* hint: load_rgb also serves greenmim-visualize
    with pytest.raises(CorruptImageError, match=r"cannot read image .*corrupt\.jpg .*data\.on_corrupt=skip"):
        ImageFiles([str(files["corrupt"])], pretrain_transform(64), on_corrupt="error")[0]


def test_folder_lists_recursively_and_skips_corrupt_images(tmp_path, caplog):
    files = write_odd_images(tmp_path)
    paths = list_folder(str(tmp_path))
    assert len(paths) == 6 and not any(p.endswith(".txt") for p in paths)
    ds = ImageFiles(paths, pretrain_transform(64), on_corrupt="skip")
    corrupt = paths.index(str(files["corrupt"]))
    report = CountReport()
    with caplog.at_level(logging.WARNING, logger="greenmim"):
        x = ds[corrupt]
    assert x.shape == (3, 64, 64) and ds.skipped == 1
    assert not caplog.text  # counted: the trainer logs one total per epoch
    assert re.fullmatch(r"epoch 1: skipped 1 unreadable image\(s\), e\.g\. .*corrupt\.jpg \(data\.on_corrupt=error stops at the "
                        r"first instead\)(; converted 1 image\(s\) to RGB: .*)?", report.log("epoch 1"))
    assert report.log("epoch 2") is None  # nothing new
    with pytest.raises(CorruptImageError):
        ImageFiles(paths, pretrain_transform(64), on_corrupt="error")[corrupt]
    with pytest.raises(DataError, match="data.on_corrupt must be one of"):
        ImageFiles(paths, pretrain_transform(64), on_corrupt="ignore")


def flat_images(p):
    Image.new("RGB", (40, 40)).save(p / "x.png")
    return p


@pytest.mark.parametrize(
    "make, name, message",
    [
        (lambda p: p / "nope", "folder", r"data.root=.*nope does not exist: point it at a folder of images"),
        (lambda p: p, "folder", r"no images .* found under .*: check data.root"),
        (lambda p: p, "imagefolder", r"no images .* in the class folders of .*: check data.root"),
        (flat_images, "imagefolder", r"has no class sub-folders .* use data=folder"),
        (lambda p: None, "folder", r"data.root is not set: pass data.root="),
    ],
)
def test_bad_folders_have_clear_messages(tmp_path, make, name, message):
    base = tmp_path / "root"
    base.mkdir()
    root = make(base)
    if name == "folder" or root is None or not any(root.glob("*.png")):
        (base / "empty_sub").mkdir(exist_ok=True)
        (base / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=message) as err:
        build_pretrain_dataset(yaml_node("pretrain", "data", "data=imagefolder", name=name, root=None if root is None else str(root), img_size=64))
    assert "\n" not in str(err.value)


def test_synthetic_images_are_deterministic_and_loader_is_sharded():
    ds = SyntheticImages(8, pretrain_transform(64), size=80)
    assert np.array_equal(np.asarray(ds.image(3)), np.asarray(SyntheticImages(8, None, size=80).image(3)))
    loaders = [build_train_loader(ds, 2, DistInfo(rank=r, world_size=2), seed=0, num_workers=0) for r in range(2)]
    assert all(len(loader) == 2 for loader in loaders)
    assert next(iter(loaders[0])).shape == (2, 3, 64, 64)
    with pytest.raises(DataError, match="fewer than one batch"):
        build_train_loader(ds, 8, DistInfo(rank=0, world_size=2))


def test_bad_sizes_and_model_names_have_clear_messages():
    with pytest.raises(ConfigError, match=r"image size 100x100 is not a multiple of the mask unit \(32 px"):
        build_pretrain_model(MICRO, 100)
    with pytest.raises(ConfigError, match=r"gives a 6x6 grid at stage 3, not a multiple of the 4x4 window"):
        build_pretrain_model(MICRO, 96)
    with pytest.raises(ConfigError, match=r"unknown model 'swin_bse_patch4_window7_224': did you mean swin_base_patch4_window7_224"):
        build_pretrain_model({**MICRO, "name": "swin_bse_patch4_window7_224"}, 64)


def test_hymenoptera_imagefolder_reads_every_file_including_the_palette_gif(hymenoptera):
    paths = list_imagefolder(str(hymenoptera), "train")
    assert len(paths) > 200 and any(p.endswith(".gif") for p in paths)
    gif = next(p for p in paths if p.endswith(".gif"))
    assert load_rgb(gif).mode == "RGB"
    ds = build_pretrain_dataset(yaml_node("pretrain", "data", "data=imagefolder", root=str(hymenoptera), split="train", img_size=64))
    assert ds[paths.index(gif)].shape == (3, 64, 64) and torch.isfinite(ds[0]).all()
