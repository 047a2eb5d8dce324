"""``greenmim-visualize``: original / masked / reconstruction grids of given images from a checkpoint.

    greenmim-visualize outputs/pretrain/run/checkpoints/step-00000096.pt photo1.jpg photo2.png -o recon.png
    greenmim-visualize CHECKPOINT /folder/of/images --max-images 8 --mask-ratio 0.75 --seed 1

Images are resized (short side) and centre-cropped to the checkpoint's ``data.img_size`` (or
``--img-size``, a multiple of 32). Predictions of norm-pix models are un-normalised with each
unit's mean and std, as in MAE's visualisations.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ..data import eval_transform, list_folder, load_rgb
from ..engine.checkpoint import write_error
from ..engine.errors import ConfigError, UserError
from ..engine.monitor import setup_logging
from ..engine.progress import progress
from ..plan.masking import check_mask_ratio
from ..tasks.pretrain.task import build_pretrain_model
from ..tasks.pretrain.reconstructions import reconstruction_grid, save_png
from ..weights.loading import load_pretrain_checkpoint
from .common import output_file, report_errors

PROG = "greenmim-visualize"
log = logging.getLogger("greenmim")


def collect_images(inputs: Sequence[str], max_images: int) -> List[str]:
    paths: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            paths += list_folder(item, what="the folder argument")
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise UserError(f"no such image or folder: {item}")
    return paths[:max_images]


def visualize(checkpoint: str, inputs: Sequence[str], output: str, mask_ratio: Optional[float] = None,
              seed: int = 0, img_size: Optional[int] = None, max_images: int = 8) -> Path:
    """Render the reconstruction grid of ``inputs`` with the model of ``checkpoint`` into ``output``."""
    if max_images < 1:
        raise UserError(f"--max-images {max_images} must be >= 1 (the number of images to show)")
    log.info("reading %s...", checkpoint)
    ckpt = load_pretrain_checkpoint(checkpoint)
    config = ckpt["config"]
    out = output_file(output, "reconstructions.png", (".png", ".jpg", ".jpeg"), [checkpoint, *inputs])
    size = img_size or config["data"]["img_size"]
    log.info("building the model (%s, %s px)...", config["model"].get("name"), size)
    try:
        model = build_pretrain_model(config["model"], size)
    except ConfigError as exc:  # name this command's option, not the training config key
        raise UserError(str(exc).replace("data.img_size", "--img-size")) from None
    ratio = config["model"]["mask_ratio"] if mask_ratio is None else mask_ratio
    check_mask_ratio(ratio, size, model.unit, key="--mask-ratio")
    model.load_state_dict(ckpt["model"])
    transform = eval_transform(size)
    paths = collect_images(inputs, max_images)
    if not paths:
        raise UserError("no images given: pass image files or folders after the checkpoint")
    images = torch.stack([transform(load_rgb(p)) for p in progress(paths, f"reading {len(paths)} images", unit="images")])
    log.info("reconstructing %d images at mask ratio %g...", len(paths), ratio)
    try:
        return save_png(reconstruction_grid(model, images, ratio, seed=seed), out)
    except OSError as exc:
        raise write_error(exc, out, then="then run the command again", elsewhere="-o") from exc


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description="Render original / masked / reconstruction grids from a pretraining checkpoint.")
    parser.add_argument("checkpoint")
    parser.add_argument("images", nargs="+", help="image files and/or folders")
    parser.add_argument("-o", "--output", default="reconstructions.png")
    parser.add_argument("--mask-ratio", type=float, default=None, help="default: the checkpoint's model.mask_ratio")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    parser.add_argument("--img-size", type=int, default=None, help="default: the checkpoint's data.img_size")
    parser.add_argument("--max-images", type=int, default=8)
    args = parser.parse_args(argv)
    setup_logging(None)  # the progress lines, on stdout
    with report_errors(PROG):
        out = visualize(args.checkpoint, args.images, args.output, args.mask_ratio, args.seed, args.img_size, args.max_images)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
