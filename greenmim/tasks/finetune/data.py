"""Labelled image data for fine-tuning: ImageNet-layout class folders, timm transforms, Mixup/CutMix.

Layout (any folder-per-class dataset works the same way)::

    root/train/<class>/*.jpg        root/val/<class>/*.jpg

or, with ``val_labels=FILE``, the flat ILSVRC validation layout ``root/val/*.JPEG`` plus a label file:
one ``<file name or stem> <class>`` pair per line (whitespace or comma separated; ``<class>`` is a
train folder name such as ``n01440764`` or a 0-based class index), or Kaggle's
``LOC_val_solution.csv`` (``ImageId,PredictionString``: the first word is the synset).

Classes are the sorted train folder names (torchvision's ``find_classes``); the validation set is indexed with the *train* mapping, so both always agree.

Transforms are timm's :func:`~timm.data.create_transform`: RandomResizedCrop + flip + RandAugment
``rand-m9-mstd0.5-inc1`` + random erasing 0.25 (bicubic) for training, resize to ``img_size /
crop_pct`` + center crop for evaluation (224/256 at ``crop_pct=0.875``).
"""
from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf
from timm.data import Mixup, create_transform
from torch.utils.data import Dataset
from torchvision.datasets.folder import find_classes, make_dataset

from ...data.datasets import ImageFiles, listing
from ...data.images import IMAGE_EXTENSIONS, DataError
from ...engine.errors import ConfigError
from .compat import patch_timm_posterize

_logger = logging.getLogger(__name__)


def list_class_folder(directory: str, class_to_idx: Optional[Dict[str, int]] = None) -> Tuple[List[Tuple[str, int]], Dict[str, int]]:
    """``(samples, class_to_idx)`` of a folder-per-class directory (torchvision's listing rules).

    Without ``class_to_idx`` the classes are the sorted sub-folder names (train). With it (val), the
    folders must be a subset of those classes and keep their indices.
    """
    try:
        _, found = find_classes(directory)
    except FileNotFoundError:
        raise DataError(f"{directory} has no class sub-folders: expected {directory}/<class>/<image> (ImageNet layout)") from None
    if class_to_idx is None:
        class_to_idx = found
    else:
        unknown = sorted(set(found) - set(class_to_idx))
        if unknown:
            raise DataError(
                f"{directory} has class folders that the train split lacks: {', '.join(unknown[:5])}; "
                "train and val must use the same class folder names"
            )
        absent = sorted(set(class_to_idx) - set(found))
        if absent:
            _logger.warning("%s lacks %d of the train classes (e.g. %s)", directory, len(absent), ", ".join(absent[:3]))
    paths: List[str] = []
    with listing(directory, paths):
        samples = make_dataset(directory, {c: class_to_idx[c] for c in found}, extensions=IMAGE_EXTENSIONS, allow_empty=True)
        paths += [p for p, _ in samples]
    counts = Counter(t for _, t in samples)
    empty = sorted(c for c in found if counts[class_to_idx[c]] == 0)
    if empty:
        raise DataError(
            f"class folder(s) without images ({', '.join(IMAGE_EXTENSIONS)}) in {directory}: {', '.join(empty[:5])}; "
            "add images or delete the empty folder(s)"
        )
    return samples, dict(class_to_idx)


LABEL_FILE_FORMAT = "UTF-8 text with one '<file name> <class folder or index>' line per image, or Kaggle's LOC_val_solution.csv"


def read_label_file(path: str) -> Dict[str, str]:
    """``{file name or stem: class}`` from a flat-validation label file (see the module docstring);
    a file that is not UTF-8 text (a binary file, an archive) is a :class:`DataError` naming the format."""
    if not os.path.isfile(path):
        raise DataError(f"data.val_labels={path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
        if "\0" in text:  # decodes as UTF-8 but holds NUL bytes: binary all the same
            raise UnicodeError(path)
    except UnicodeError:
        raise DataError(f"data.val_labels={path} is not a text file: expected {LABEL_FILE_FORMAT}") from None
    labels: Dict[str, str] = {}
    lines = text.splitlines()
    for row in csv.reader(lines) if path.endswith(".csv") else (line.split() for line in lines):
        if not row or row[0].startswith("#") or row[0] == "ImageId":
            continue
        if len(row) < 2:
            raise DataError(f"{path}: expected '<file> <class>' per line, got '{' '.join(row)}'")
        labels[row[0].strip()] = row[1].split()[0]
    if not labels:
        raise DataError(f"label file {path} is empty")
    return labels


def list_flat_labelled(directory: str, label_file: str, class_to_idx: Dict[str, int]) -> List[Tuple[str, int]]:
    """Samples of the flat ILSVRC validation layout: images directly in ``directory``, labels from a file."""
    labels = read_label_file(label_file)
    files = sorted(p for p in Path(directory).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"no images directly in {directory}: data.val_labels is only for the flat ILSVRC validation layout")
    samples = []
    for p in files:
        label = labels.get(p.name, labels.get(p.stem))
        if label is None:
            raise DataError(f"{label_file} has no label for {p.name}")
        if label in class_to_idx:
            idx = class_to_idx[label]
        elif label.isdigit() and int(label) < len(class_to_idx):
            idx = int(label)
        else:
            raise DataError(f"{label_file}: label '{label}' of {p.name} is neither a train class folder nor a class index")
        samples.append((str(p), idx))
    return samples


def labelled_images(samples: List[Tuple[str, int]], transform: Optional[Callable], on_corrupt: str) -> ImageFiles:
    """``(image, label)`` items with the pretraining data's RGB conversion and unreadable-file policy."""
    return ImageFiles([p for p, _ in samples], transform, on_corrupt, targets=[t for _, t in samples])


def build_transform(is_training: bool, img_size: int, data: Any, aug: Any = None) -> Callable:
    """timm's ``create_transform``: the recipe's training augmentation (options from the ``aug``
    config: ``scale``, ``hflip``, ``color_jitter``, ``auto_augment``, ``reprob``, ``remode``,
    ``recount``) or the evaluation resize to ``img_size / data.crop_pct`` + center crop; both with
    ``data.interpolation``. ``aug`` is needed for training only."""
    interpolation = data["interpolation"]
    if not is_training:
        return create_transform(input_size=img_size, is_training=False, interpolation=interpolation, crop_pct=float(data["crop_pct"]))
    if aug["auto_augment"]:
        patch_timm_posterize()  # timm's RandAugment vs Pillow >= 11 (see greenmim.tasks.finetune.compat); idempotent
    return create_transform(
        input_size=img_size,
        is_training=True,
        scale=tuple(aug["scale"]),
        hflip=float(aug["hflip"]),
        color_jitter=aug["color_jitter"],
        auto_augment=aug["auto_augment"] or None,  # null or "": none
        interpolation=interpolation,
        re_prob=float(aug["reprob"]),
        re_mode=aug["remode"],
        re_count=int(aug["recount"]),
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


def _split_dir(root: Path, name: str) -> str:
    path = root / name
    if not path.is_dir():
        raise DataError(f"{path} does not exist: data.root must be the folder holding {name}/ (ImageNet layout: root/train/<class>/*, root/val/<class>/*)")
    return str(path)


def build_classification_data(cfg: Any, aug: Any, need_train: bool = True, train_augment: bool = True) -> ClassificationData:
    """Datasets from a ``data`` config and the ``aug`` config.

    ``data`` keys: ``root``, ``train_split``/``val_split`` (``train``/``val``), ``val_labels`` (flat
    ILSVRC val), ``num_classes`` (``null``: inferred, else checked), ``img_size``, ``crop_pct``,
    ``interpolation`` and ``on_corrupt`` (training images: ``skip`` | ``error``; validation images are
    always ``error``, so accuracies are exact). ``aug``: see :func:`build_transform`.
    ``train_augment=False`` gives the train split the evaluation transform (frozen-feature protocols);
    ``aug`` may then be None.
    """
    if aug is None and need_train and train_augment:
        raise ValueError("build_classification_data: the training transform needs the aug config "
                         "(e.g. greenmim.engine.config.compose('finetune').aug)")
    if (OmegaConf.is_config(cfg) and OmegaConf.is_missing(cfg, "root")) or cfg["root"] in (None, "", "???"):
        raise ConfigError("data.root is not set: pass data.root=/path/to/dataset (a folder holding train/ and val/ class folders)")
    root = Path(os.path.expanduser(str(cfg["root"])))
    if not root.is_dir():
        raise DataError(f"data.root={root} is not a folder: point it at the folder holding train/ and val/")
    img_size = int(cfg["img_size"])
    train_dir = _split_dir(root, cfg["train_split"])
    train_samples, class_to_idx = list_class_folder(train_dir)
    classes = sorted(class_to_idx, key=class_to_idx.get)
    if len(classes) < 2:
        raise DataError(
            f"{train_dir} has a single class folder ({classes[0]}): a classifier needs at least 2 classes, "
            "one sub-folder of images per class"
        )
    expected = cfg["num_classes"]
    if expected not in (None, "auto") and int(expected) != len(classes):
        raise ConfigError(
            f"data.num_classes={expected} but {train_dir} has {len(classes)} class folders; "
            f"set data.num_classes={len(classes)} (or null to infer it)"
        )
    val_dir = _split_dir(root, cfg["val_split"])
    if cfg["val_labels"]:
        val_samples = list_flat_labelled(val_dir, str(cfg["val_labels"]), class_to_idx)
    else:
        val_samples, _ = list_class_folder(val_dir, class_to_idx)
    train = None
    val_tf = build_transform(False, img_size, cfg)
    if need_train:
        train_tf = build_transform(True, img_size, cfg, aug) if train_augment else val_tf
        train = labelled_images(train_samples, train_tf, cfg["on_corrupt"])
    val = labelled_images(val_samples, val_tf, "error")
    return ClassificationData(train=train, val=val, classes=classes)


# -- mixup and losses -------------------------------------------------------------------------------
def build_mixup(cfg: Any, num_classes: int) -> Optional[Mixup]:
    """timm's :class:`Mixup` (batch mode; label smoothing folded into the soft targets), or ``None``."""
    minmax = cfg["cutmix_minmax"]
    active = cfg["mixup"] > 0 or cfg["cutmix"] > 0 or minmax is not None
    if not active or cfg["mixup_prob"] <= 0:
        return None
    return Mixup(
        mixup_alpha=cfg["mixup"],
        cutmix_alpha=cfg["cutmix"],
        cutmix_minmax=None if minmax is None else tuple(minmax),
        prob=cfg["mixup_prob"],
        switch_prob=cfg["mixup_switch_prob"],
        mode=cfg["mixup_mode"],
        label_smoothing=cfg["smoothing"],
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
