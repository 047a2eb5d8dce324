"""Labelled image data for fine-tuning: ImageNet-layout class folders, timm transforms, Mixup/CutMix.

Layout (any folder-per-class dataset works the same way)::

    root/train/<class>/*.jpg        root/val/<class>/*.jpg

or, with ``val_labels=FILE``, the flat ILSVRC validation layout ``root/val/*.JPEG`` plus a label file:
one ``<file name or stem> <class>`` pair per line (whitespace or comma separated; ``<class>`` is a
train folder name such as ``n01440764`` or a 0-based class index), or Kaggle's
``LOC_val_solution.csv`` (``ImageId,PredictionString``: the first word is the synset).

Classes are the sorted train folder names (torchvision's :class:`~torchvision.datasets.ImageFolder`
rule); the validation set is indexed with the *train* mapping, so both always agree.

Transforms are timm's :func:`~timm.data.create_transform`: RandomResizedCrop + flip + RandAugment
``rand-m9-mstd0.5-inc1`` + random erasing 0.25 (bicubic) for training, resize to ``img_size /
crop_pct`` + center crop for evaluation (224/256 at ``crop_pct=0.875``).
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..engine.errors import ConfigError, UserError

_logger = logging.getLogger(__name__)

#: torchvision's extensions plus GIF (hymenoptera has one) and upper-case variants.
EXTENSIONS = tuple(sorted(set(IMG_EXTENSIONS + (".gif",))))


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB (palette/transparent, grayscale and CMYK files included).

    Raises :class:`UserError` naming the file when PIL cannot decode it.
    """
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
    except Exception as exc:  # PIL.UnidentifiedImageError, OSError (truncated), ...
        raise UserError(f"unreadable image {path} ({type(exc).__name__}: {exc}): remove or replace the file") from exc
    if img.mode == "P" and "transparency" in img.info or img.mode in ("LA", "PA"):
        img = img.convert("RGBA")
    return img.convert("RGB")


class ClassFolder(ImageFolder):
    """:class:`ImageFolder` with a fixed ``class_to_idx`` (so val follows train), GIF support, RGB
    loading and errors that name the fix."""

    def __init__(self, root: str, transform: Optional[Callable] = None, class_to_idx: Optional[Dict[str, int]] = None):
        self._given = class_to_idx
        try:
            super().__init__(root, transform=transform, loader=load_rgb, extensions=EXTENSIONS)
        except FileNotFoundError as exc:  # an empty class folder or no class folders at all
            raise UserError(f"{root}: {exc} Add images or delete the empty folder.") from exc

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        classes, mapping = super().find_classes(directory)
        if self._given is None:
            return classes, mapping
        unknown = sorted(set(classes) - set(self._given))
        if unknown:
            raise UserError(
                f"{directory} has class folders that train/ lacks: {', '.join(unknown[:5])}; "
                "train and val must use the same class folder names"
            )
        absent = sorted(set(self._given) - set(classes))
        if absent:
            _logger.warning("%s lacks %d of the train classes (e.g. %s)", directory, len(absent), ", ".join(absent[:3]))
        return sorted(self._given, key=self._given.get), dict(self._given)


def read_label_file(path: str) -> Dict[str, str]:
    """``{file name or stem: class}`` from a flat-validation label file (see the module docstring)."""
    labels: Dict[str, str] = {}
    with open(path, newline="") as f:
        for row in csv.reader(f) if path.endswith(".csv") else (line.split() for line in f):
            if not row or row[0].startswith("#") or row[0] == "ImageId":
                continue
            if len(row) < 2:
                raise UserError(f"{path}: expected '<file> <class>' per line, got '{' '.join(row)}'")
            labels[row[0].strip()] = row[1].split()[0]
    if not labels:
        raise UserError(f"label file {path} is empty")
    return labels


class FlatLabelledFolder(Dataset):
    """The flat ILSVRC validation layout: images directly in ``root``, labels from a file."""

    def __init__(self, root: str, label_file: str, class_to_idx: Dict[str, int], transform: Optional[Callable] = None):
        labels = read_label_file(label_file)
        self.transform = transform
        self.classes = sorted(class_to_idx, key=class_to_idx.get)
        self.class_to_idx = dict(class_to_idx)
        files = sorted(p for p in Path(root).iterdir() if p.suffix.lower() in EXTENSIONS)
        if not files:
            raise UserError(f"no images directly in {root}: val_labels is only for the flat ILSVRC validation layout")
        self.samples: List[Tuple[str, int]] = []
        for p in files:
            label = labels.get(p.name, labels.get(p.stem))
            if label is None:
                raise UserError(f"{label_file} has no label for {p.name}")
            if label in class_to_idx:
                idx = class_to_idx[label]
            elif label.isdigit() and int(label) < len(self.classes):
                idx = int(label)
            else:
                raise UserError(f"{label_file}: label '{label}' of {p.name} is neither a train class folder nor a class index")
            self.samples.append((str(p), idx))
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        img = load_rgb(path)
        return (self.transform(img) if self.transform else img), target


def build_transform(is_training: bool, img_size: int, cfg: Any) -> Callable:
    """timm's ``create_transform`` with the fine-tune recipe's options taken from ``cfg`` (``data``)."""
    if is_training:
        return create_transform(
            input_size=img_size,
            is_training=True,
            scale=tuple(cfg.get("scale", (0.08, 1.0))),
            hflip=cfg.get("hflip", 0.5),
            color_jitter=cfg.get("color_jitter", 0.4),
            auto_augment=cfg.get("auto_augment") or None,
            interpolation=cfg.get("interpolation", "bicubic"),
            re_prob=cfg.get("reprob", 0.25),
            re_mode=cfg.get("remode", "pixel"),
            re_count=cfg.get("recount", 1),
            mean=tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)),
            std=tuple(cfg.get("std", IMAGENET_DEFAULT_STD)),
        )
    return create_transform(
        input_size=img_size,
        is_training=False,
        interpolation=cfg.get("interpolation", "bicubic"),
        crop_pct=cfg.get("crop_pct", 0.875),
        mean=tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_DEFAULT_STD)),
    )


@dataclass
class ClassificationData:
    """The datasets of a fine-tuning run; ``classes[i]`` is the name of class index ``i``."""

    train: Optional[Dataset]
    val: Dataset
    classes: List[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _split_dir(root: Path, name: str) -> Path:
    path = root / name
    if not path.is_dir():
        raise UserError(f"{path} does not exist: data.root must hold train/ and val/ folders (ImageNet layout)")
    return path


def build_classification_data(cfg: Any, need_train: bool = True) -> ClassificationData:
    """Datasets from a ``data`` config: ``root``, ``train_split``/``val_split`` (``train``/``val``),
    ``val_labels`` (flat ILSVRC val), ``num_classes`` (``null``: inferred, else checked), ``img_size``
    and the transform options of :func:`build_transform`."""
    if not cfg.get("root"):
        raise ConfigError("data.root is not set: pass data.root=/path/to/dataset (holding train/ and val/ class folders)")
    root = Path(os.path.expanduser(str(cfg["root"])))
    if not root.is_dir():
        raise UserError(f"data.root={root} does not exist")
    img_size = int(cfg["img_size"])
    train_dir = _split_dir(root, cfg.get("train_split", "train"))
    train_tf = build_transform(True, img_size, cfg) if need_train else None
    train = ClassFolder(str(train_dir), transform=train_tf)
    classes = list(train.classes)
    expected = cfg.get("num_classes")
    if expected not in (None, "auto") and int(expected) != len(classes):
        raise ConfigError(
            f"data.num_classes={expected} but {train_dir} has {len(classes)} class folders; "
            f"set data.num_classes={len(classes)} (or null to infer it)"
        )
    val_dir = _split_dir(root, cfg.get("val_split", "val"))
    val_tf = build_transform(False, img_size, cfg)
    if cfg.get("val_labels"):
        val: Dataset = FlatLabelledFolder(str(val_dir), str(cfg["val_labels"]), train.class_to_idx, transform=val_tf)
    else:
        val = ClassFolder(str(val_dir), transform=val_tf, class_to_idx=train.class_to_idx)
    return ClassificationData(train=train if need_train else None, val=val, classes=classes)


# -- mixup and losses -------------------------------------------------------------------------------
def build_mixup(cfg: Any, num_classes: int) -> Optional[Mixup]:
    """timm's :class:`Mixup` (batch mode; label smoothing folded into the soft targets), or ``None``."""
    active = cfg.get("mixup", 0.0) > 0 or cfg.get("cutmix", 0.0) > 0 or cfg.get("cutmix_minmax") is not None
    if not active or cfg.get("mixup_prob", 1.0) <= 0:
        return None
    return Mixup(
        mixup_alpha=cfg.get("mixup", 0.8),
        cutmix_alpha=cfg.get("cutmix", 1.0),
        cutmix_minmax=cfg.get("cutmix_minmax"),
        prob=cfg.get("mixup_prob", 1.0),
        switch_prob=cfg.get("mixup_switch_prob", 0.5),
        mode=cfg.get("mixup_mode", "batch"),
        label_smoothing=cfg.get("smoothing", 0.1),
        num_classes=num_classes,
    )


def build_train_criterion(mixup: Optional[Mixup], smoothing: float) -> torch.nn.Module:
    """SoftTargetCrossEntropy with mixup; label-smoothed CE without; plain CE when smoothing is 0."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup is not None:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return torch.nn.CrossEntropyLoss()
