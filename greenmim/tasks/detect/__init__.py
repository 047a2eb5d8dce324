"""Transfer to COCO detection: Mask R-CNN (torchvision) with a greenmim-pretrained Swin/Twins backbone.

* :mod:`.backbone`: timm trunk with 4 stage outputs (strides 4/8/16/32) + torchvision FPN;
* :mod:`.model`: :func:`build_maskrcnn`;
* :mod:`.data`: :class:`CocoDetection` (pycocotools; polygons/RLE, crowd, id mapping, flip);
* :mod:`.evaluate`: :class:`CocoEvaluator` (COCOeval bbox + segm, results JSON, DDP gathering);
* :mod:`.prepare`: the COCO paths of a ``data`` config (standard layout under ``data.root``), checked;
* :mod:`.task`: :class:`DetectionTask` for the shared engine;
* :mod:`.run`: the flows ``greenmim-detect`` calls: training, and evaluating a checkpoint (``eval_only``);
* :mod:`.synthetic`: a generated COCO-format dataset of drawn shapes (smoke runs, tests).

(``scripts/detection_timing.py`` times Mask R-CNN iterations for the README's figures.)
"""
from .backbone import TimmFPNBackbone, TimmTrunk, build_backbone
from .data import CocoDetection, CocoFileNotFoundError, CocoFormatError, collate, hflip
from .evaluate import CocoEvaluator, ground_truth_as_predictions, to_coco_results
from .model import MaskRCNNDetector, build_maskrcnn

__all__ = [
    "TimmTrunk", "TimmFPNBackbone", "build_backbone", "build_maskrcnn", "MaskRCNNDetector",
    "CocoDetection", "CocoFormatError", "CocoFileNotFoundError", "collate", "hflip",
    "CocoEvaluator", "ground_truth_as_predictions", "to_coco_results",
]
