"""The fine-tuning classifier: timm's own Swin/Twins model, optionally initialised from pretrained weights."""
from __future__ import annotations

import difflib
import logging
from typing import Any, Optional, Tuple

import timm
import torch.nn as nn

from ...engine.errors import ConfigError
from ...weights.loading import LoadReport, load_pretrained

_logger = logging.getLogger(__name__)


def create_classifier(
    name: str,
    num_classes: int,
    drop_path_rate: float = 0.1,
    pretrained: Optional[str] = None,
    use_ema: bool = False,
    **overrides: Any,
) -> Tuple[nn.Module, Optional[LoadReport]]:
    """``timm.create_model(name, num_classes=..., drop_path_rate=..., **overrides)`` plus weights.

    ``overrides`` are timm constructor arguments (``img_size``, ``window_size``, ``embed_dim``,
    ``depths``, ``num_heads``, ...). ``pretrained`` is a greenmim pretraining checkpoint, an
    exported encoder (``.safetensors``) or a timm checkpoint file (see
    :func:`~greenmim.weights.loading.load_pretrained`); ``None`` trains from scratch.
    Nothing is ever downloaded. Returns ``(model, load_report_or_None)``.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(["swin*", "twins*", "pvt_v2*"]), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models('swin*') / ('twins*') / ('pvt_v2*')"
        raise ConfigError(f"unknown model.name '{name}': {hint}")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path_rate, **overrides)
    except TypeError as exc:
        raise ConfigError(f"model.encoder_args do not fit {name}: {exc}") from exc
    report = load_pretrained(model, pretrained, use_ema=use_ema) if pretrained else None
    return model, report
