"""Mask R-CNN (torchvision) over a timm Swin/Twins + FPN backbone.

The detector is torchvision's :class:`~torchvision.models.detection.MaskRCNN` unchanged: RPN with
one anchor size per FPN level (32..512, ratios 0.5/1/2), RoIAlign box head (two FC layers) and
4-conv mask head, as in the Swin/Twins Mask R-CNN recipes. Its ``GeneralizedRCNNTransform``
normalises with the ImageNet mean/std of the pretraining, resizes every image so that its short
side is ``min_size`` (a tuple: one drawn at random per image in training, the last one at
evaluation; this is the multi-scale option) without the long side exceeding ``max_size``, and pads
the batch to a multiple of 32.

Parameter names in the detector: ``backbone.trunk.model.*`` is the timm model (timm's keys),
``backbone.trunk.out_norms.*`` the per-stage output norms, ``backbone.fpn.*``, ``rpn.*`` and
``roi_heads.*`` torchvision's.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Sequence, Union

from torchvision.models.detection import MaskRCNN

from .backbone import TimmFPNBackbone, TimmTrunk

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRUNK_PREFIX = "backbone.trunk.model."


class MaskRCNNDetector(MaskRCNN):
    """torchvision's :class:`MaskRCNN`, plus ``encoder``: its :class:`TimmTrunk` (a property, not a
    second registration, so the state dict is unchanged). The engine's
    ``trainer.grad_checkpointing`` (``true`` or a list of stages) acts on ``model.encoder``."""

    @property
    def encoder(self) -> TimmTrunk:
        return self.backbone.trunk


def build_maskrcnn(
    backbone: str,
    num_classes: int,
    pretrained: Optional[str] = None,
    min_size: Union[int, Sequence[int]] = 800,
    max_size: int = 1333,
    fpn_channels: int = 256,
    out_norm: Optional[bool] = None,
    grad_checkpointing: bool = False,
    use_ema: bool = False,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    detector_kwargs: Optional[Dict[str, Any]] = None,
    **backbone_overrides: Any,
) -> MaskRCNNDetector:
    """Build the detector.

    Args:
        backbone: timm model name (``swin_*`` / ``twins_*``).
        num_classes: object classes K, without the background (the model predicts ``K + 1``).
        pretrained: checkpoint for the trunk (greenmim pretraining checkpoint, exported encoder,
            timm checkpoint); ``None`` starts from random init. The load report is at
            ``model.backbone.trunk.load_report``.
        min_size, max_size: short-side size(s) and long-side cap of the resize.
        detector_kwargs: any other :class:`MaskRCNN` argument (``box_detections_per_img``,
            ``rpn_post_nms_top_n_train``, ...).
        **backbone_overrides: timm constructor arguments of the trunk (``drop_path_rate``,
            ``window_size``, ``embed_dim``, ``depths``, ``num_heads``, ...).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (object classes without background), got {num_classes}")
    trunk = TimmTrunk(backbone, pretrained=pretrained, use_ema=use_ema, out_norm=out_norm,
                      grad_checkpointing=grad_checkpointing, **backbone_overrides)
    body = TimmFPNBackbone(trunk, fpn_channels)
    sizes = tuple(int(s) for s in min_size) if isinstance(min_size, (list, tuple)) else int(min_size)
    model = MaskRCNNDetector(
        body,
        num_classes=num_classes + 1,
        min_size=sizes,
        max_size=int(max_size),
        image_mean=list(image_mean),
        image_std=list(image_std),
        **(detector_kwargs or {}),
    )
    if trunk.load_report is not None:
        log.info(
            "detector initialised from %s; not loaded (detection-only, fresh): backbone.trunk.out_norms, "
            "backbone.fpn, rpn, roi_heads; the checkpoint's final norm/head are unused (pruned)",
            trunk.load_report.source,
        )
    return model

