"""Detection backbone: a timm Swin/Twins/PVTv2 trunk giving 4 stage outputs, plus torchvision's FPN.

The trunk is timm's own classification model (``timm.create_model(name)``), so its parameter names
are exactly timm's and a greenmim checkpoint, an exported encoder, a fine-tuned classifier or a timm
checkpoint loads into it through the fine-tuning loader without conversion. Its 4 stage outputs come
from timm's ``forward_intermediates`` (NCHW); after loading, the final ``norm`` and the classifier,
which detection does not use, are pruned (``prune_intermediate_layers``).

Outputs of :class:`TimmFPNBackbone` (what torchvision's Mask R-CNN consumes): an ``OrderedDict``
``"0".."3"`` at strides 4/8/16/32 and ``"pool"`` at stride 64 (``LastLevelMaxPool``), each with
``out_channels`` (256) channels. The trunk's own stage channels, ``trunk.channels``, are
``C, 2C, 4C, 8C`` for Swin (``C = embed_dim``: 96 Swin-T/S, 128 Swin-B, 192 Swin-L) and the
``embed_dims`` for Twins (64/128/256/512 for ``twins_svt_small`` / ``twins_pcpvt_small`` has
64/128/320/512).

Arbitrary detection sizes (timm 1.0.31): Swin is built with ``strict_img_size=False`` (the same as
``dynamic_img_size=True``: the shifted-window attention masks are built for each input on the fly,
stage maps that are not a multiple of the window are zero-padded inside each block) and
``always_partition=True`` (every stage keeps its window and shift even where the map is smaller than
the window, as the official Swin detection backbone does; by default timm would shrink windows and
drop the shift to fit the construction-time ``img_size``). torchvision's ``GeneralizedRCNNTransform``
pads each batch to a multiple of 32, so the stage maps are exactly ``H/4, H/8, H/16, H/32``.
One difference from the official detection code stays: timm pads *after* the cyclic shift, the
official code before it, so border windows of maps that are not a multiple of the window group
tokens slightly differently (weights are interchangeable; outputs differ at those borders only).
Twins (locally-grouped and global sub-sampled attention, PEG convolutions) takes any size whose
stage maps divide by its sub-sampling ratios, which a multiple of 32 guarantees; so does PVTv2
(``pvt_v2_b0``..``b5``: channels ``embed_dims``, 64/128/320/512 from B1 on), whose stage outputs
are timm's, each after its stage's own LayerNorm.

Following the official Swin detection backbone, a fresh LayerNorm is applied to each stage output
(``out_norm``, default on for Swin, off for Twins whose official detector uses raw stage outputs and
for PVTv2 whose stages end with their own norm).
"""
from __future__ import annotations

import difflib
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import timm
import torch
import torch.nn as nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ...engine.errors import ConfigError
from ...weights.loading import LoadReport, load_pretrained

FAMILIES = ("swin", "twins", "pvt_v2")


def model_family(name: str) -> str:
    """``"swin"`` (V1 or V2: the same stages and options), ``"twins"`` or ``"pvt_v2"`` from a timm model
    name; a clear error for anything else."""
    base = name.split(".")[0]
    if base.startswith("swin_") or (base.startswith("swinv2_") and not base.startswith("swinv2_cr_")):
        return "swin"
    if base.startswith("twins_"):
        return "twins"
    if base.startswith("pvt_v2_"):
        return "pvt_v2"
    raise ConfigError(
        f"detection backbone '{name}' is not supported: use a timm swin_*, swinv2_* (not swinv2_cr_*), twins_* or pvt_v2_* "
        f"model name, e.g. swin_tiny_patch4_window7_224, swin_base_patch4_window7_224, twins_svt_small, pvt_v2_b2"
    )


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (parameter names as ``nn.LayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TimmTrunk(nn.Module):
    """A timm Swin/Twins model returning its 4 stage outputs as NCHW maps.

    Args:
        name: timm model name (``swin_*`` or ``twins_*``).
        pretrained: a greenmim pretraining checkpoint, an exported encoder or a timm checkpoint,
            loaded by :func:`greenmim.weights.loading.load_pretrained` (relative-position
            tables resized to the detection windows, anything but the classifier missing or
            unexpected is an error); the report is kept in ``load_report``. The checkpoint's final
            ``norm`` and classifier are loaded, then pruned: detection does not use them.
        use_ema: take the checkpoint's EMA weights.
        out_norm: a fresh LayerNorm on each stage output; ``None`` picks the family's default.
        grad_checkpointing: activation checkpointing inside timm's stages (saves memory; Swin and PVTv2).
        **overrides: timm constructor arguments (``embed_dim``, ``depths``, ``num_heads``,
            ``window_size``, ``drop_path_rate``, ...).

    Attributes:
        model: the timm model (its ``state_dict`` keys are timm's, prefixed ``model.`` here).
        channels: the 4 stage channel counts; ``strides``: ``(4, 8, 16, 32)``.
    """

    def __init__(self, name: str, pretrained: Optional[str] = None, use_ema: bool = False,
                 out_norm: Optional[bool] = None, grad_checkpointing: bool = False, **overrides: Any):
        super().__init__()
        self.name = name
        self.family = model_family(name)
        kwargs: Dict[str, Any] = dict(overrides)
        if self.family == "swin":
            kwargs.setdefault("strict_img_size", False)
            kwargs.setdefault("always_partition", True)
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(["swin_*", "twins_*", "pvt_v2_*"]), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models('swin_*') / ('twins_*') / ('pvt_v2_*')"
            raise ConfigError(f"unknown backbone model '{name}': {hint}")
        try:
            # built with its classifier so that any checkpoint (with or without head) loads through the
            # fine-tuning loader unchanged; the head and the final norm are pruned right after
            model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"model.encoder_args do not fit {name}: {exc}") from exc
        if len(model.feature_info) != 4:
            raise ConfigError(f"{name} has {len(model.feature_info)} stages; the detection backbone needs 4")
        self.load_report: Optional[LoadReport] = None
        if pretrained:
            self.load_report = load_pretrained(model, pretrained, use_ema=use_ema)
        model.prune_intermediate_layers(indices=4, prune_norm=True, prune_head=True)
        self.model = model
        if grad_checkpointing:
            self.set_grad_checkpointing(True)
        self.channels: List[int] = [int(f["num_chs"]) for f in model.feature_info]
        self.strides: List[int] = [int(f["reduction"]) for f in model.feature_info]
        if out_norm is None:
            out_norm = self.family == "swin"
        self.out_norms = nn.ModuleList([LayerNorm2d(c) for c in self.channels]) if out_norm else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in every stage (timm's switch; Swin and PVTv2, timm's Twins has none)."""
        if enable and self.family == "twins":
            raise ConfigError(f"activation checkpointing is not available for timm's {self.name}; set trainer.grad_checkpointing=false")
        self.model.set_grad_checkpointing(enable)

    @property
    def layers(self) -> Optional[nn.Module]:
        """Swin's stages (for per-stage activation checkpointing: ``trainer.grad_checkpointing=[0,1]``)."""
        return self.model.layers if self.family == "swin" else None

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = self.model.forward_intermediates(x, intermediates_only=True)
        if self.out_norms is not None:
            feats = [norm(f) for norm, f in zip(self.out_norms, feats)]
        return feats


class TimmFPNBackbone(nn.Module):
    """Trunk + :class:`torchvision.ops.FeaturePyramidNetwork` (+ ``LastLevelMaxPool``) for Mask R-CNN.

    ``forward(images) -> OrderedDict("0", "1", "2", "3", "pool")``; ``out_channels`` is what
    torchvision's detectors read.
    """

    def __init__(self, trunk: TimmTrunk, out_channels: int = 256):
        super().__init__()
        self.trunk = trunk
        self.fpn = FeaturePyramidNetwork(trunk.channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.trunk(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def build_backbone(name: str, fpn_channels: int = 256, **trunk_kwargs: Any) -> TimmFPNBackbone:
    """Convenience: :class:`TimmTrunk` (``pretrained``, ``out_norm``, timm overrides, ...) + FPN."""
    return TimmFPNBackbone(TimmTrunk(name, **trunk_kwargs), fpn_channels)

