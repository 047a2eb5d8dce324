"""COCO evaluation of Mask R-CNN outputs: results files in COCO results format and COCOeval metrics.

Flow (DDP-correct): every rank calls :meth:`CocoEvaluator.update` with its model outputs; then
:meth:`CocoEvaluator.synchronize` gathers the per-image results of all ranks with
``all_gather_object`` (keyed by image id, so the repeated samples that ``DistributedSampler`` pads
with count once); rank 0 writes the results and runs COCOeval for ``bbox`` and ``segm``.

Results format (as COCO's ``loadRes`` and the evaluation server expect): one list per task,
``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` for ``bbox`` and
``{"image_id", "category_id", "segmentation": RLE, "score"}`` for ``segm``, where the RLE
``counts`` is a utf-8 string (masks are thresholded at 0.5 after paste-back, as torchvision does).
Category ids are the dataset's own (the contiguous labels are mapped back).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ...engine.monitor import FILE_ONLY

log = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def encode_masks(masks: np.ndarray) -> List[Dict[str, Any]]:
    """``(N, H, W)`` bool/uint8 masks -> COCO RLEs with string ``counts`` (JSON-serialisable)."""
    from pycocotools import mask as mask_util

    if len(masks) == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(np.transpose(masks.astype(np.uint8), (1, 2, 0))))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("utf-8")
    return rles


def to_coco_results(
    output: Mapping[str, torch.Tensor],
    image_id: int,
    label_to_cat: Mapping[int, int],
    mask_threshold: float = 0.5,
) -> Dict[str, List[Dict[str, Any]]]:
    """One image's model output (``boxes`` xyxy, ``labels``, ``scores``, optional ``masks``
    ``(N, 1, H, W)`` probabilities or ``(N, H, W)`` binary) -> ``{"bbox": [...], "segm": [...]}``."""
    boxes = output["boxes"].detach().float().cpu()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    xywh = boxes.clone()
    xywh[:, 2:] -= xywh[:, :2]
    cats = []
    for lab in labels:
        if lab not in label_to_cat:
            raise KeyError(f"label {lab} has no category id: the model predicts {max(labels)} classes, the dataset has {len(label_to_cat)}")
        cats.append(label_to_cat[lab])
    res: Dict[str, List[Dict[str, Any]]] = {
        "bbox": [
            {"image_id": int(image_id), "category_id": int(c), "bbox": [round(float(v), 3) for v in b], "score": float(s)}
            for b, c, s in zip(xywh.tolist(), cats, scores)
        ],
        "segm": [],
    }
    if "masks" in output:
        masks = output["masks"].detach().cpu()
        if masks.dim() == 4:
            masks = masks[:, 0]
        binary = (masks > mask_threshold) if masks.is_floating_point() else masks.bool()
        rles = encode_masks(binary.numpy())
        res["segm"] = [
            {"image_id": int(image_id), "category_id": int(c), "segmentation": r, "score": float(s)}
            for r, c, s in zip(rles, cats, scores)
        ]
    return res


def all_gather_dict(local: Dict[int, Any]) -> Dict[int, Any]:
    """Union of a per-rank ``{image_id: results}`` dict over all ranks (identity without DDP)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(local)
    gathered: List[Optional[Dict[int, Any]]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    merged: Dict[int, Any] = {}
    for part in gathered:
        merged.update(part or {})
    return merged


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def coco_eval(coco_gt, results: List[Dict[str, Any]], iou_type: str, img_ids: Optional[Sequence[int]] = None):
    """Run COCOeval on one results list; returns ``({"AP": .., "AP50": .., ...}, summary_text)``."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {k: 0.0 for k in STAT_NAMES}, f"{iou_type}: no detections, every AP is 0"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if img_ids is not None:
            ev.params.imgIds = sorted(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval reports -1 where a size range has no ground truth; keep that convention
    table = "\n".join(line for line in buf.getvalue().splitlines() if line.lstrip().startswith("Average"))
    return {k: float(v) for k, v in zip(STAT_NAMES, ev.stats[:6])}, table


class CocoEvaluator:
    """Collects Mask R-CNN outputs across ranks and evaluates them with COCOeval.

    Args:
        coco_gt: the ground truth :class:`pycocotools.coco.COCO` (crowd annotations included).
        label_to_cat: contiguous label -> dataset category id.
        iou_types: ``("bbox", "segm")`` by default.
        mask_threshold: probability above which a pasted mask pixel is foreground.
    """

    def __init__(self, coco_gt, label_to_cat: Mapping[int, int], iou_types: Iterable[str] = IOU_TYPES,
                 mask_threshold: float = 0.5):
        self.coco_gt = coco_gt
        self.label_to_cat = dict(label_to_cat)
        self.iou_types = tuple(iou_types)
        bad = [t for t in self.iou_types if t not in IOU_TYPES]
        if bad:
            raise ValueError(f"unknown iou type(s) {bad}: choose from {', '.join(IOU_TYPES)}")
        self.mask_threshold = mask_threshold
        self.per_image: Dict[int, Dict[str, List[Dict[str, Any]]]] = {}

    def update(self, outputs: Sequence[Mapping[str, torch.Tensor]], image_ids: Sequence[int]) -> None:
        """Add the outputs of a batch (``model(images)`` in eval mode) for the given image ids."""
        for out, img_id in zip(outputs, image_ids):
            img_id = int(img_id)
            self.per_image[img_id] = to_coco_results(out, img_id, self.label_to_cat, self.mask_threshold)

    def synchronize(self) -> Dict[int, Dict[str, List[Dict[str, Any]]]]:
        """Gather every rank's per-image results (call on all ranks)."""
        return all_gather_dict(self.per_image)

    def evaluate(self, output_dir: Optional[str] = None, prefix: str = "") -> Dict[str, float]:
        """Gather, then on rank 0 write ``{prefix}results_{bbox,segm}.json`` and run COCOeval.

        Returns ``{"bbox_AP": .., "bbox_AP50": .., ..., "segm_APl": ..}`` on rank 0, ``{}`` elsewhere.
        Only the evaluated images count (a subset run is scored on its own images).
        """
        merged = self.synchronize()
        if not is_main_process():
            return {}
        img_ids = sorted(merged)
        metrics: Dict[str, float] = {}
        for iou_type in self.iou_types:
            results = [r for img_id in img_ids for r in merged[img_id][iou_type]]
            if output_dir:
                os.makedirs(output_dir, exist_ok=True)
                path = os.path.join(output_dir, f"{prefix}results_{iou_type}.json")
                tmp = path + ".tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(results, f)
                os.replace(tmp, path)
            stats, text = coco_eval(self.coco_gt, results, iou_type, img_ids)
            log.info("COCO %s on %d images:\n%s", iou_type, len(img_ids), text, extra=FILE_ONLY)  # the tables: train.log only
            metrics.update({f"{iou_type}_{k}": v for k, v in stats.items()})
        return metrics


def ground_truth_as_predictions(dataset, index: int) -> Dict[str, torch.Tensor]:
    """A perfect "prediction" of one dataset image, built from its training target (score 1).

    Feeding these through :class:`CocoEvaluator` must give AP 1.0: it checks the label -> category
    mapping, the box format and the mask encoding end to end.
    """
    target = dataset.target(dataset.ids[index])
    n = len(target["labels"])
    return {
        "boxes": target["boxes"],
        "labels": target["labels"],
        "scores": torch.ones(n),
        "masks": target["masks"][:, None].float(),
    }
