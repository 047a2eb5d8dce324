"""A generated COCO-format instance segmentation dataset: drawn shapes with exact polygon masks.

For smoke runs, tests and benchmarks without a download. Every image holds a few filled shapes
(rectangles, triangles, ellipses as polygons) on a textured background; each class has its own
colour family so a small detector can learn it within minutes on a CPU. Category ids are sparse
(``1, 3, 7, ...``) on purpose, to exercise the id -> contiguous label mapping.

Optionally one annotation is stored as compressed RLE, one as uncompressed RLE, and one image gets
an ``iscrowd=1`` region (uncompressed RLE, as COCO stores crowds), so every COCO annotation form
is on the path.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("rectangle", "triangle", "ellipse")
CATEGORY_IDS = (1, 3, 7)  # sparse, like COCO's 1..90
COLOURS = {"rectangle": (220, 40, 40), "triangle": (40, 200, 40), "ellipse": (40, 60, 230)}


def shape_polygon(kind: str, cx: float, cy: float, rx: float, ry: float) -> List[float]:
    """Flat ``[x1, y1, x2, y2, ...]`` polygon of a shape centred at ``(cx, cy)`` with radii ``rx, ry``."""
    if kind == "rectangle":
        pts = [(cx - rx, cy - ry), (cx + rx, cy - ry), (cx + rx, cy + ry), (cx - rx, cy + ry)]
    elif kind == "triangle":
        pts = [(cx, cy - ry), (cx + rx, cy + ry), (cx - rx, cy + ry)]
    else:
        pts = [(cx + rx * math.cos(2 * math.pi * t / 20), cy + ry * math.sin(2 * math.pi * t / 20)) for t in range(20)]
    return [round(float(v), 2) for p in pts for v in p]


def _bbox_of(mask: np.ndarray) -> List[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def write_synthetic_coco(
    root: str,
    num_images: int = 8,
    size: Tuple[int, int] = (160, 192),
    objects: Tuple[int, int] = (1, 3),
    split: str = "train",
    seed: int = 0,
    with_rle: bool = True,
    with_crowd: bool = True,
    empty_images: int = 0,
) -> Tuple[str, str]:
    """Write ``root/{split}/*.png`` and ``root/annotations/instances_{split}.json``.

    Args:
        size: ``(height, width)`` of the first image; the others vary by up to -25% per side.
        objects: (min, max) shapes per image.
        empty_images: extra images without any annotation at the end.

    Returns ``(image_dir, annotation_file)``.
    """
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(seed)
    img_dir = os.path.join(root, split)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    categories = [{"id": cid, "name": kind, "supercategory": "shape"} for cid, kind in zip(CATEGORY_IDS, SHAPES)]
    images: List[Dict] = []
    annotations: List[Dict] = []
    ann_id = 1
    rle_done = {"compressed": not with_rle, "uncompressed": not with_rle, "crowd": not with_crowd}
    for i in range(num_images + empty_images):
        h, w = size if i == 0 else (int(size[0] * rng.uniform(0.75, 1.0)), int(size[1] * rng.uniform(0.75, 1.0)))
        base = rng.integers(90, 170, size=3)
        noise = rng.integers(-20, 20, size=(h, w, 3))
        canvas = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        image_id = 1000 + 7 * i  # sparse image ids as well
        images.append({"id": image_id, "file_name": f"{split}_{i:04d}.png", "height": h, "width": w})
        n = 0 if i >= num_images else int(rng.integers(objects[0], objects[1] + 1))
        for _ in range(n):
            k = int(rng.integers(len(SHAPES)))
            kind = SHAPES[k]
            rx, ry = rng.uniform(0.1, 0.25) * w, rng.uniform(0.1, 0.25) * h
            cx, cy = rng.uniform(rx + 1, w - rx - 1), rng.uniform(ry + 1, h - ry - 1)
            poly = shape_polygon(kind, cx, cy, rx, ry)
            colour = tuple(int(np.clip(c + rng.integers(-25, 25), 0, 255)) for c in COLOURS[kind])
            draw.polygon(poly, fill=colour)
            rles = mask_util.frPyObjects([poly], h, w)
            rle = mask_util.merge(rles)
            mask = mask_util.decode(rle)
            if mask.sum() == 0:
                continue
            segmentation: object = [poly]
            if not rle_done["compressed"]:
                segmentation = {"size": [h, w], "counts": rle["counts"].decode("utf-8")}
                rle_done["compressed"] = True
            elif not rle_done["uncompressed"]:
                segmentation = uncompressed_rle(mask)
                rle_done["uncompressed"] = True
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": CATEGORY_IDS[k], "iscrowd": 0,
                "segmentation": segmentation, "area": float(mask_util.area(rle)), "bbox": _bbox_of(mask),
            })
            ann_id += 1
        if n and not rle_done["crowd"]:
            # a crowd region in a corner: uncompressed RLE, iscrowd=1 (COCO's convention)
            crowd = np.zeros((h, w), dtype=np.uint8)
            crowd[: h // 6, : w // 6] = 1
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": CATEGORY_IDS[0], "iscrowd": 1,
                "segmentation": uncompressed_rle(crowd), "area": float(crowd.sum()), "bbox": _bbox_of(crowd),
            })
            ann_id += 1
            rle_done["crowd"] = True
        canvas.save(os.path.join(img_dir, images[-1]["file_name"]))
    ann_file = os.path.join(root, "annotations", f"instances_{split}.json")
    with open(ann_file, "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return img_dir, ann_file


def uncompressed_rle(mask: np.ndarray) -> Dict[str, object]:
    """COCO's uncompressed RLE (``counts`` a list of run lengths, column-major, starting with zeros)."""
    flat = np.asarray(mask, dtype=np.uint8).reshape(-1, order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).astype(int).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def ensure_synthetic_coco(root: str, num_train: int = 64, num_val: int = 16, size: Tuple[int, int] = (160, 192),
                          seed: int = 0) -> Dict[str, str]:
    """Generate train and val splits under ``root`` unless the same ones are there; returns the four paths.

    The generation parameters are recorded in ``root/synthetic.json``; other parameters regenerate.
    """
    params = {"num_train": int(num_train), "num_val": int(num_val), "size": [int(v) for v in size], "seed": int(seed)}
    marker = os.path.join(root, "synthetic.json")
    current = None
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            current = json.load(f)
    paths: Dict[str, str] = {}
    for split, n, s in (("train", num_train, seed), ("val", num_val, seed + 1)):
        img_dir, ann = os.path.join(root, split), os.path.join(root, "annotations", f"instances_{split}.json")
        if current != params or not os.path.isfile(ann):
            img_dir, ann = write_synthetic_coco(root, n, tuple(size), split=split, seed=s)
        paths[f"{split}_images"], paths[f"{split}_ann"] = img_dir, ann
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(params, f)
    return paths
