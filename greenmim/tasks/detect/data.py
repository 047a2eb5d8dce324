"""COCO-format instance segmentation data for Mask R-CNN (pycocotools-backed).

:class:`CocoDetection` reads an ``instances_*.json`` file plus an image folder and yields
``(image, target)`` pairs in torchvision's detection format:

* ``image``: ``(3, H, W)`` float tensor in ``[0, 1]`` at the file's own size (resizing to the short
  side, multi-scale included, and normalisation happen in the model's
  :class:`~torchvision.models.detection.transform.GeneralizedRCNNTransform`, as in torchvision's
  detection references);
* ``target``: ``boxes`` ``(N, 4)`` float xyxy in pixels, ``labels`` ``(N,)`` int64 contiguous
  labels ``1..K`` (0 is the background), ``masks`` ``(N, H, W)`` uint8, ``image_id``, ``area``,
  ``iscrowd``.

COCO conventions kept here:

* category ids (sparse in COCO: 1..90 for 80 classes) are mapped to contiguous labels ``1..K`` in
  ascending id order; :attr:`CocoDetection.label_to_cat` maps them back for the results file;
* ids of images, annotations and categories are integers (a string id is refused);
* masks come from polygons, uncompressed RLE or compressed RLE (``COCO.annToMask``); an RLE must
  have the image's ``[height, width]`` and runs covering it exactly (:mod:`.rle`);
* crowd annotations (``iscrowd=1``) are left out of the training targets (their boxes are not
  trained on); evaluation sees them through the ground-truth file, where COCOeval ignores
  detections matched to them, as the official evaluation does;
* images without (usable) annotations are kept or dropped (``filter_empty``); torchvision's Mask
  R-CNN trains on empty images as pure negatives.

Bad input is reported early, at construction: a missing or malformed annotation file raises with
the fix; images listed but absent on disk raise (``missing_images="error"``) or are dropped with a
count (``"skip"``); malformed boxes (non-finite, zero or negative width/height, or empty after
clipping to the image) and annotations without a segmentation are dropped with a count
(``bad_boxes="skip"``) or raise (``"error"``). A training image that does not decode is met in a
loader worker and follows pretraining's ``data.on_corrupt``: skipped with a warning and a count, the
next readable image taking its place (``"skip"``), or a one-line error (``"error"``).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ...data.datasets import ImageFiles
from ...data.images import DECODE_CHECK_LIMIT
from ...data.transforms import rgb_pixels
from ...engine.config import SKIP_OR_ERROR
from ...engine.errors import ConfigError, UserError
from ...engine.progress import progress
from .rle import rle_problem

log = logging.getLogger(__name__)

POLICIES = SKIP_OR_ERROR


class CocoFormatError(UserError):
    """A COCO annotation file that cannot be used as is; the message names the file and the fix."""


class CocoFileNotFoundError(UserError, FileNotFoundError):
    """An annotation file, image folder or listed image that is not on disk."""


def quiet_coco(dataset: Dict[str, Any]):
    """A :class:`pycocotools.coco.COCO` over an already-loaded dict, without its index chatter."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_coco_json(ann_file: str) -> Dict[str, Any]:
    """Read and validate the top-level structure of a COCO instances file.

    Raises :class:`FileNotFoundError` / :class:`CocoFormatError` with a message naming the problem
    and the fix, instead of pycocotools' bare ``KeyError``/``AssertionError``.
    """
    if not ann_file:
        raise CocoFormatError("no annotation file given: set data.train_ann= / data.val_ann= to an instances_*.json file")
    if not os.path.isfile(ann_file):
        raise CocoFileNotFoundError(
            f"annotation file not found: {ann_file} (set data.root= to the COCO folder, which holds "
            f"annotations/instances_train2017.json, or data.train_ann= / data.val_ann= to the file itself)"
        )
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise CocoFormatError(f"annotation file {ann_file} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CocoFormatError(f"annotation file {ann_file} must hold a JSON object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise CocoFormatError(
                f"annotation file {ann_file} has no '{key}' list: not a COCO instances file "
                f"(expected keys images, annotations, categories)"
            )
        if not isinstance(data[key], list):
            raise CocoFormatError(f"annotation file {ann_file}: '{key}' must be a list")
    if not data["categories"]:
        raise CocoFormatError(f"annotation file {ann_file} defines no categories")
    for what, required in (("images", ("id", "file_name", "height", "width")), ("categories", ("id",)),
                           ("annotations", ("id", "image_id", "category_id", "bbox"))):
        for i, item in enumerate(data[what]):
            missing = [k for k in required if k not in item]
            if missing:
                raise CocoFormatError(
                    f"annotation file {ann_file}: {what}[{i}] lacks {', '.join(missing)} "
                    f"(every entry of '{what}' needs {', '.join(required)})"
                )
    for what, keys in (("images", ("id",)), ("categories", ("id",)), ("annotations", ("id", "image_id", "category_id"))):
        for item in data[what]:
            for key in keys:
                if not isinstance(item[key], int) or isinstance(item[key], bool):
                    raise CocoFormatError(
                        f"annotation file {ann_file}: {what[:-1]} {key} {item[key]!r} is not an integer "
                        f"(COCO ids are integers): renumber the {what} with integer ids"
                    )
    for what in ("images", "categories", "annotations"):
        ids = [item["id"] for item in data[what]]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise CocoFormatError(f"annotation file {ann_file}: duplicate {what[:-1]} id {dup}")
    image_ids = {im["id"] for im in data["images"]}
    cat_ids = {c["id"] for c in data["categories"]}
    for ann in data["annotations"]:
        if ann["image_id"] not in image_ids:
            raise CocoFormatError(f"annotation file {ann_file}: annotation {ann['id']} refers to unknown image_id {ann['image_id']}")
        if ann["category_id"] not in cat_ids:
            raise CocoFormatError(
                f"annotation file {ann_file}: annotation {ann['id']} refers to unknown category_id {ann['category_id']}"
            )
    return data


def check_box(ann: Dict[str, Any], width: int, height: int) -> Optional[str]:
    """Why an annotation cannot be trained on, or None when it can."""
    bbox = ann.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return "bbox is not [x, y, w, h]"
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return "bbox has non-numeric values"
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return "bbox has non-finite values"
    if w <= 0 or h <= 0:
        return f"bbox has zero or negative size (w={w:g}, h={h:g})"
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, float(width)), min(y + h, float(height))
    if x2 <= x1 or y2 <= y1:
        return "bbox lies outside the image"
    seg = ann.get("segmentation")
    if not seg:
        return "no segmentation (Mask R-CNN needs a polygon or RLE mask)"
    return None


def check_segmentation(seg: Any, height: int, width: int) -> Optional[str]:
    """Why a ``segmentation`` cannot be turned into a mask of its ``height`` x ``width`` image, or None
    when it can (an empty one is :func:`check_box`'s concern). Polygons need an even number of finite
    coordinates and at least 3 points each; RLEs the image's size and valid counts (:func:`~.rle.rle_problem`)."""
    if not seg:
        return None
    if isinstance(seg, dict):
        return rle_problem(seg, height, width)
    if not isinstance(seg, list):
        return "segmentation is neither a list of polygons nor an RLE"
    for poly in seg:
        if not isinstance(poly, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly):
            return "polygon is not a flat list of numbers [x1, y1, x2, y2, ...]"
        if len(poly) % 2:
            return f"polygon has an odd number of coordinates ({len(poly)})"
        if len(poly) < 6:
            return f"polygon has {len(poly) // 2} point(s), fewer than 3"
        if not all(math.isfinite(v) for v in poly):
            return "polygon has non-finite coordinates"
    return None


@dataclass
class DataReport:
    """What construction dropped, for the log and the closing metrics."""

    images: int = 0
    annotations: int = 0
    categories: int = 0
    missing_images: int = 0
    empty_images_dropped: int = 0
    bad_annotations: int = 0
    crowd_annotations: int = 0
    examples: List[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.images} images", f"{self.annotations} annotations", f"{self.categories} categories"]
        if self.missing_images:
            parts.append(f"{self.missing_images} listed images missing on disk (skipped)")
        if self.empty_images_dropped:
            parts.append(f"{self.empty_images_dropped} images without usable annotations dropped")
        if self.bad_annotations:
            parts.append(f"{self.bad_annotations} malformed annotations skipped")
        if self.crowd_annotations:
            parts.append(f"{self.crowd_annotations} crowd annotations ignored in training")
        return ", ".join(parts)


class CocoDetection(Dataset):
    """COCO instances file + image folder -> ``(image, target)`` for torchvision's Mask R-CNN.

    Args:
        img_dir: folder the ``file_name`` entries are relative to.
        ann_file: the ``instances_*.json`` file.
        train: training mode: crowd annotations leave the targets, random horizontal flip.
        flip_prob: probability of the horizontal flip in training.
        filter_empty: drop images without any usable (non-crowd, well-formed) annotation.
        bad_boxes: ``"skip"`` (count and drop) or ``"error"`` for malformed annotations.
        missing_images: ``"error"`` or ``"skip"`` (count and drop) for images absent on disk.
        max_images: keep only the first N images (ascending id) for quick runs; 0 keeps all.
        on_corrupt: ``"skip"`` or ``"error"`` for an image that does not decode when it is loaded
            (see the module docstring); validation sets are checked up front by :meth:`check_images`.
    """

    def __init__(
        self,
        img_dir: str,
        ann_file: str,
        train: bool = True,
        flip_prob: float = 0.5,
        filter_empty: bool = True,
        bad_boxes: str = "skip",
        missing_images: str = "error",
        max_images: int = 0,
        on_corrupt: str = "skip",
    ):
        for name, value in (("bad_boxes", bad_boxes), ("missing_images", missing_images), ("on_corrupt", on_corrupt)):
            if value not in POLICIES:
                raise ConfigError(f"data.{name}={value!r}: choose one of {', '.join(POLICIES)}")
        if not os.path.isdir(img_dir):
            raise CocoFileNotFoundError(
                f"image folder not found: {img_dir} (set data.root= to the COCO folder holding train2017/ and val2017/, "
                f"or data.train_images= / data.val_images=)"
            )
        self.img_dir = img_dir
        self.ann_file = ann_file
        self.train = train
        self.flip_prob = flip_prob
        self.report = DataReport()
        dataset = self._drop_bad_segmentations(load_coco_json(ann_file), bad_boxes)
        self.coco = quiet_coco(dataset)
        self.cat_ids: List[int] = sorted(self.coco.getCatIds())
        self.cat_to_label: Dict[int, int] = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat: Dict[int, int] = {i + 1: c for i, c in enumerate(self.cat_ids)}
        self.class_names: List[str] = [self.coco.cats[c].get("name", str(c)) for c in self.cat_ids]
        self.ids, self.anns = self._scan(bad_boxes, missing_images, filter_empty, max_images)
        self.report.images = len(self.ids)
        self.report.annotations = sum(len(anns) for anns in self.anns.values())
        self.report.categories = len(self.cat_ids)
        # decoding (and on_corrupt) is pretraining's; an item is (image, id of the image actually read)
        self.files = ImageFiles([os.path.join(img_dir, self.coco.imgs[i]["file_name"]) for i in self.ids], to_tensor,
                                on_corrupt, targets=self.ids)
        if not self.ids:
            raise CocoFormatError(
                f"no usable images in {ann_file} with images under {img_dir} ({self.report.summary()}); "
                f"check data.root / the image folder, or set data.filter_empty=false"
            )

    @property
    def num_classes(self) -> int:
        """Object classes K (labels 1..K; Mask R-CNN gets K + 1 with the background)."""
        return len(self.cat_ids)

    def _note_bad(self, msg: str, bad_boxes: str) -> None:
        """Count a malformed annotation (``bad_boxes="skip"``) or raise naming it (``"error"``)."""
        if bad_boxes == "error":
            raise CocoFormatError(f"{self.ann_file}: {msg} (set data.bad_boxes=skip to drop such annotations with a count)")
        self.report.bad_annotations += 1
        if len(self.report.examples) < 5:
            self.report.examples.append(msg)

    def _drop_bad_segmentations(self, dataset: Dict[str, Any], bad_boxes: str) -> Dict[str, Any]:
        """``dataset`` without the annotations whose segmentation cannot be decoded (polygons of fewer
        than 3 points, odd coordinate counts, broken RLEs): pycocotools would crash on them in
        training and in evaluation, where the ground truth is this index."""
        kept = []
        sizes = {im["id"]: (im["height"], im["width"]) for im in dataset["images"]}
        for ann in dataset["annotations"]:
            why = check_segmentation(ann.get("segmentation"), *sizes[ann["image_id"]])
            if why is None:
                kept.append(ann)
            else:
                self._note_bad(f"annotation {ann['id']} of image id {ann['image_id']}: {why}", bad_boxes)
        return {**dataset, "annotations": kept}

    def _scan(self, bad_boxes: str, missing_images: str, filter_empty: bool, max_images: int):
        ids, anns_of = [], {}
        missing = []
        report = self.report
        for img_id in sorted(self.coco.imgs):
            info = self.coco.imgs[img_id]
            if not os.path.isfile(os.path.join(self.img_dir, info["file_name"])):
                missing.append(info["file_name"])
                continue
            usable = []
            for ann in self.coco.imgToAnns.get(img_id, []):
                if ann.get("iscrowd", 0):
                    report.crowd_annotations += 1
                    continue
                why = check_box(ann, info["width"], info["height"])
                if why is not None:
                    self._note_bad(f"annotation {ann['id']} of image {info['file_name']}: {why}", bad_boxes)
                    continue
                usable.append(ann)
            if filter_empty and not usable:
                report.empty_images_dropped += 1
                continue
            ids.append(img_id)
            anns_of[img_id] = usable
            if max_images and len(ids) >= max_images:
                break
        if missing:
            if missing_images == "error":
                raise CocoFileNotFoundError(
                    f"{len(missing)} image(s) listed in {self.ann_file} are absent under {self.img_dir}, "
                    f"e.g. {', '.join(missing[:3])} (fix the folder, or set data.missing_images=skip to drop them)"
                )
            report.missing_images = len(missing)
            log.warning("%d listed images missing under %s, skipped (e.g. %s)", len(missing), self.img_dir, missing[0])
        if report.bad_annotations:
            log.warning(
                "skipped %d malformed annotations in %s (set data.bad_boxes=error to fail instead), e.g. %s",
                report.bad_annotations, self.ann_file, "; ".join(report.examples[:3]),
            )
        return ids, anns_of

    def check_images(self, decode_limit: int = DECODE_CHECK_LIMIT) -> None:
        """Raise before training when a listed image does not open or its size differs from the JSON
        (decoded in full for up to ``decode_limit`` images, headers only beyond), rather than in the
        middle of an evaluation."""
        full = len(self.ids) <= decode_limit
        for img_id in progress(self.ids, f"checking the {len(self.ids)} images of {self.ann_file}", unit="images"):
            info = self.coco.imgs[img_id]
            path = os.path.join(self.img_dir, info["file_name"])
            try:
                with Image.open(path) as im:
                    if full:
                        im.load()
                    size = (im.width, im.height)
            except Exception as exc:  # PIL raises many types for bad files
                raise CocoFileNotFoundError(
                    f"cannot read image {path} ({type(exc).__name__}: {exc}): remove or replace it, or drop it from {self.ann_file}"
                ) from None
            if size != (info["width"], info["height"]):
                raise CocoFormatError(
                    f"{path} is {size[0]}x{size[1]} but {self.ann_file} says {info['width']}x{info['height']}: "
                    f"fix the file's width/height entries"
                )

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, index: int) -> Tuple[torch.Tensor, int]:
        """``(image, image id)`` of item ``index``, or of the next readable one when it does not
        decode and ``on_corrupt="skip"``; a size other than the JSON's is an error."""
        image, img_id = self.files[index]
        info = self.coco.imgs[img_id]
        if tuple(image.shape[1:]) != (info["height"], info["width"]):
            raise CocoFormatError(
                f"{os.path.join(self.img_dir, info['file_name'])} is {image.shape[2]}x{image.shape[1]} but {self.ann_file} "
                f"says {info['width']}x{info['height']}: fix the file's width/height entries"
            )
        return image, img_id

    def target(self, img_id: int) -> Dict[str, torch.Tensor]:
        """The training target of one image (crowd and malformed annotations left out)."""
        info = self.coco.imgs[img_id]
        h, w = info["height"], info["width"]
        anns = self.anns[img_id]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, w)
        boxes[:, 1::2].clamp_(0, h)
        if anns:
            masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns]))
        else:
            masks = torch.zeros((0, h, w), dtype=torch.uint8)
        return {
            "boxes": boxes,
            "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": masks,
            "image_id": torch.tensor(img_id),
            "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        image, img_id = self.load_image(index)
        target = self.target(img_id)
        if self.train and self.flip_prob > 0 and random.random() < self.flip_prob:
            image, target = hflip(image, target)
        return image, target


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a ``(3, H, W)`` float tensor in ``[0, 1]``."""
    return rgb_pixels(image).float().div_(255.0)


def hflip(image: torch.Tensor, target: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Flip an image and its target left-right: boxes ``x1' = W - x2``, ``x2' = W - x1``; masks mirrored."""
    width = image.shape[-1]
    image = image.flip(-1)
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image, target


def collate(batch: Sequence[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]):
    """Detection batches stay lists: images differ in size (the model pads them to a multiple of 32)."""
    return tuple(zip(*batch))

