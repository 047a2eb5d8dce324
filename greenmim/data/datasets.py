"""Unlabelled image datasets for pretraining and their distributed loader.

Every dataset returns one transformed image per index (labels are ignored): with the pretraining
augmentation a uint8 ``(3, H, W)`` crop (``data.decode=cpu``) or the file's bytes and crop plan
(``data.decode=device``, decoded batched in the main process: :mod:`greenmim.data.device_decode`).

* ``imagefolder``: ImageNet layout ``root/<split>/<class>/<image>`` (``root`` itself when it has no
  ``<split>`` sub-folder); classes from torchvision's ``find_classes``, files in ``make_dataset``'s order.
* ``folder``: every image file below ``root``, recursively, in sorted order.

Both follow symbolic links to folders, but list each real folder once (:func:`walk_image_dirs`): a
link to a folder already listed (a link to an ancestor loops, and would repeat every image once per
level of nesting the file system allows) is skipped with a warning. Following them at most once keeps
the common use (a data folder assembled from links to other disks) working.
* ``synthetic``: deterministic generated pictures (gradients, shapes, stripes), no files needed.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import find_classes

from ..engine.config import SKIP_OR_ERROR
from ..engine.distributed import DistInfo
from ..engine.sampler import ResumableDistributedSampler, SeededDataset
from ..engine.image_counts import ImageCounts, counting
from .images import IMAGE_EXTENSIONS, CorruptImageError, DataError, check_root, is_image_file, load_rgb
from .transforms import PretrainCrop, image_hw

log = logging.getLogger("greenmim")

CORRUPT_POLICIES = SKIP_OR_ERROR
DATASETS = ("imagefolder", "folder", "synthetic")
DECODE_MODES = ("cpu", "device")


class ImageFiles(Dataset):
    """Images from a list of paths (with their labels when ``targets`` is given).

    Args:
        paths: image files.
        transform: PIL RGB image -> sample; a transform with a ``from_file(path)`` method (the
            pretraining crops: they decode only what the crop needs) is given the path instead.
        on_corrupt: ``skip`` (count, and return the next readable image instead; the trainer logs the
            epoch's total, :mod:`greenmim.engine.image_counts`) or ``error``.
        max_consecutive_skips: give up after this many unreadable files in a row.
        targets: optional labels, one per path; then an item is ``(image, label)`` of the file
            actually read (a skipped file's replacement keeps its own label). Used by fine-tuning.
        corrupt_hint: appended to the error for an unreadable file under ``on_corrupt="error"``
            (the default names ``data.on_corrupt=skip``; validation sets, which never skip, say so).
    """

    def __init__(self, paths: Sequence[str], transform: Callable, on_corrupt: str = "skip", max_consecutive_skips: int = 50,
                 targets: Optional[Sequence[int]] = None, corrupt_hint: str = "or set data.on_corrupt=skip to skip such files"):
        if on_corrupt not in CORRUPT_POLICIES:
            raise DataError(f"data.on_corrupt must be one of {', '.join(CORRUPT_POLICIES)}, got '{on_corrupt}'")
        if targets is not None and len(targets) != len(paths):
            raise ValueError(f"{len(targets)} targets for {len(paths)} paths")
        self.paths = list(paths)
        self.targets = None if targets is None else list(targets)
        self.transform = transform
        self.on_corrupt = on_corrupt
        self.corrupt_hint = corrupt_hint
        self.max_consecutive_skips = max_consecutive_skips
        self.counts = ImageCounts(self.paths)  # skipped and converted images, summed over loader workers

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def skipped(self) -> int:
        """Unreadable files skipped so far, by every process reading this dataset."""
        return self.counts.total_skipped

    def __getitem__(self, index: int):
        for attempt in range(self.max_consecutive_skips + 1):
            i = (index + attempt) % len(self.paths)
            path = self.paths[i]
            try:
                with counting(self.counts):
                    sample = self.transform.from_file(path) if hasattr(self.transform, "from_file") else self.transform(load_rgb(path))
            except CorruptImageError as exc:
                if self.on_corrupt == "error":
                    raise CorruptImageError(f"{exc}, {self.corrupt_hint}") from None
                self.counts.skipped(i)
                continue
            return sample if self.targets is None else (sample, self.targets[i])
        raise DataError(
            f"{self.max_consecutive_skips + 1} unreadable images in a row near {self.paths[index]}: check the folder's files"
        )


@contextlib.contextmanager
def listing(root: str, paths: List[str]) -> Iterator[None]:
    """Start-up lines around the listing of a data folder (a large one takes a while): ``indexing
    images under ROOT...`` before, ``N images under ROOT (t s)`` after, ``paths`` being the list filled."""
    log.info("indexing images under %s...", root)
    start = time.monotonic()
    yield
    log.info("%d images under %s (%.1f s)", len(paths), root, time.monotonic() - start)


def walk_image_dirs(top: str) -> List[Tuple[str, List[str]]]:
    """``[(folder, sorted image file names), ...]`` below ``top``, top-down, sub-folders in sorted order,
    hidden files and folders skipped. Folder links are followed, but each real folder is listed once:
    a link to one already seen (e.g. to an ancestor: a loop) is skipped, with one warning for all."""
    seen = {os.path.realpath(top)}
    repeated: List[str] = []
    listing = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        kept = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            real = os.path.realpath(os.path.join(dirpath, name))
            if real in seen:
                repeated.append(os.path.join(dirpath, name))
            else:
                seen.add(real)
                kept.append(name)
        dirnames[:] = kept
        listing.append((dirpath, sorted(f for f in filenames if is_image_file(f) and not f.startswith("."))))
    if repeated:
        log.warning("%s: skipped %d linked folder(s) that lead to a folder already listed, e.g. %s -> %s "
                    "(each real folder is read once)", top, len(repeated), repeated[0], os.path.realpath(repeated[0]))
    return listing


def list_imagefolder(root: str, split: Optional[str] = "train") -> List[str]:
    """Image paths of an ImageNet-layout folder (``root/split/class/*`` or ``root/class/*``)."""
    root = check_root(root)
    base = os.path.join(root, split) if split and os.path.isdir(os.path.join(root, split)) else root
    try:
        _, class_to_idx = find_classes(base)
    except FileNotFoundError:
        raise DataError(
            f"{base} has no class sub-folders (ImageNet layout is root/{split or 'train'}/<class>/<image>); "
            "for a plain tree of images use data=folder"
        ) from None
    paths = []
    with listing(base, paths):
        for name in sorted(class_to_idx):  # make_dataset's order: classes, then folders by path, then files
            for dirpath, filenames in sorted(walk_image_dirs(os.path.join(base, name))):
                paths += [os.path.join(dirpath, f) for f in filenames]
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {base}: check data.root")
    return paths


def list_folder(root: str, what: str = "data.root") -> List[str]:
    """Every image file below ``root`` (recursive, sorted, hidden folders skipped); ``what`` names
    the option or argument that gave ``root``, for the error messages."""
    root = check_root(root, what)
    paths: List[str] = []
    with listing(root, paths):
        paths += [os.path.join(dirpath, f) for dirpath, filenames in walk_image_dirs(root) for f in filenames]
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}: check {what}")
    return paths


class SyntheticImages(Dataset):
    """Deterministic generated pictures: a two-colour gradient, stripes and a few filled shapes.

    Image ``i`` is always the same (seeded by ``seed + i``), so runs are reproducible and need no
    download. ``size`` is the generated resolution before the transform's random crop.
    """

    def __init__(self, num_samples: int, transform: Callable, size: int = 160, seed: int = 0):
        if num_samples <= 0:
            raise DataError(f"data.num_samples must be positive, got {num_samples}")
        self.num_samples = int(num_samples)
        self.transform = transform
        self.size = int(size)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.num_samples

    def image(self, index: int) -> Image.Image:
        rng = np.random.default_rng(self.seed * 1_000_003 + index)
        s = self.size
        c0, c1 = rng.integers(0, 256, size=(2, 3))
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:s, 0:s] / max(s - 1, 1)
        t = np.clip(0.5 + (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle), 0, 1)[..., None]
        pixels = (1 - t) * c0 + t * c1
        if rng.random() < 0.5:  # soft stripes
            freq, phase = rng.uniform(2, 8), rng.uniform(0, 2 * math.pi)
            pixels += 25 * np.sin(2 * math.pi * freq * (xx * math.sin(angle) - yy * math.cos(angle)) + phase)[..., None]
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = rng.integers(-s // 4, s, size=2)
            w, h = rng.integers(s // 6, s // 2, size=2)
            color = tuple(int(v) for v in rng.integers(0, 256, size=3))
            box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
            kind = rng.integers(0, 3)
            if kind == 0:
                draw.ellipse(box, fill=color)
            elif kind == 1:
                draw.rectangle(box, fill=color)
            else:
                draw.polygon([(int(x0), int(y0 + h)), (int(x0 + w // 2), int(y0)), (int(x0 + w), int(y0 + h))], fill=color)
        return img

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.image(index))


def pretrain_augmentation(cfg: Dict[str, Any]) -> Callable:
    """The pretraining crop of a ``data`` config: decoded in the workers (``decode: cpu``, the
    default) or planned there and decoded batched in the main process (``decode: device``)."""
    from .device_decode import DeviceCrop

    crop = PretrainCrop if check_decode(cfg["decode"]) == "cpu" else DeviceCrop
    return crop(cfg["img_size"], scale=cfg["crop_scale"], hflip=cfg["hflip"])


def check_decode(value: Any) -> str:
    """``data.decode`` as one of :data:`DECODE_MODES`; raises :class:`DataError` naming the choices."""
    if value not in DECODE_MODES:
        raise DataError(f"data.decode={value!r} is not one of {', '.join(DECODE_MODES)}: use data.decode=cpu (decode in the "
                        "loader workers) or data.decode=device (workers read bytes, the main process decodes batched)")
    return value


def build_pretrain_dataset(cfg: Dict[str, Any], transform: Optional[Callable] = None) -> Dataset:
    """The dataset named by ``cfg["name"]`` (a ``data`` config: see ``configs/data/*.yaml``), with the
    pretraining augmentation (:func:`pretrain_augmentation`) unless another ``transform`` is given."""
    name = cfg["name"]
    if transform is None:
        transform = pretrain_augmentation(cfg)
    if name == "synthetic":
        size = cfg["synthetic_size"] or max(image_hw(cfg["img_size"])) * 5 // 4  # null: 5/4 of the image (room to crop)
        return SyntheticImages(cfg["num_samples"], transform, size=size, seed=cfg["synthetic_seed"])
    if name == "imagefolder":
        return ImageFiles(list_imagefolder(cfg["root"], cfg["split"]), transform, cfg["on_corrupt"])
    if name == "folder":
        return ImageFiles(list_folder(cfg["root"]), transform, cfg["on_corrupt"])
    raise DataError(f"unknown dataset '{name}': choose data=imagefolder, data=folder or data=synthetic")


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    dist: DistInfo,
    seed: int = 0,
    num_workers: int = 4,
    pin_memory: bool = True,
    shuffle: bool = True,
    collate_fn: Optional[Callable] = None,
) -> DataLoader:
    """A loader of ``batch_size`` images per process over this rank's shard (last partial batch dropped).

    Uses :class:`ResumableDistributedSampler` with per-sample augmentation seeds, so runs are
    reproducible for any ``num_workers`` and resume exactly mid-epoch. A ``collate_fn`` receives
    ``(image, seed)`` samples (e.g. :class:`~greenmim.plan.collate.MaskCollator`, which draws
    and plans the masks in the workers).
    """
    n = len(dataset)
    if n < batch_size * dist.world_size:
        raise DataError(
            f"the dataset has {n} image(s), fewer than one batch ({batch_size} per process x {dist.world_size} process(es)): "
            "add images or lower data.batch_size"
        )
    sampler = ResumableDistributedSampler(n, dist.world_size, dist.rank, shuffle=shuffle, seed=seed, drop_last=True, seeded=True)
    return DataLoader(
        SeededDataset(dataset, with_seed=collate_fn is not None),
        batch_size=batch_size,
        collate_fn=collate_fn,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory and dist.device.type == "cuda",
        drop_last=True,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # keeps the loader off the global RNG
    )
