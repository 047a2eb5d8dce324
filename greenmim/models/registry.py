"""Model registry: timm backbone names -> visible-only (greenmim) and all-token (simmim) encoders.

Each entry records the timm architecture arguments of a name (the same ones timm's entrypoint
uses), so the encoders built here have timm's parameter names and layouts and load timm weights
without any conversion.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Type

import torch.nn as nn

METHODS = ("greenmim", "simmim")


class UnknownModelError(ValueError):
    """A model name that is not registered (the message lists close matches and all names)."""


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    family: str
    args: Dict[str, Any]
    visible_cls: Type[nn.Module]
    dense_cls: Type[nn.Module]
    # keyword arguments that only the greenmim encoders understand (dropped for the dense baseline)
    visible_only_kwargs: tuple = field(default=("cost_model", "fused_attn", "sparse_backend"))


_REGISTRY: Dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec) -> None:
    _REGISTRY[spec.name] = spec


def list_encoders(family: str = "") -> List[str]:
    """Registered encoder names (timm model names), optionally of one family ('swin', 'twins')."""
    return sorted(n for n, s in _REGISTRY.items() if not family or s.family == family)


def get_spec(name: str) -> EncoderSpec:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UnknownModelError(f"unknown model '{name}': {hint}available: {', '.join(list_encoders())}")
    return _REGISTRY[name]


def create_encoder(name: str, method: str = "greenmim", **overrides: Any) -> nn.Module:
    """Build the encoder for a timm Swin/Twins name.

    ``method="greenmim"``: the visible-only encoder, ``encoder(images, mask) -> (B, N_vis, C)``.
    ``method="simmim"``: the all-token baseline, ``encoder(images, mask, mask_token) -> (B, num_units, C)``.
    ``overrides`` are timm's constructor arguments (``img_size``, ``window_size``, ``embed_dim``,
    ``depths``, ``num_heads``, ``drop_path_rate``, ...) plus the greenmim options ``cost_model``,
    ``fused_attn`` and ``sparse_backend``. The classifier head is never built (``num_classes=0``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    spec = get_spec(name)
    kwargs = dict(spec.args)
    kwargs.update(overrides)
    kwargs["num_classes"] = 0
    if method == "greenmim":
        return spec.visible_cls(**kwargs)
    for key in spec.visible_only_kwargs:
        kwargs.pop(key, None)
    return spec.dense_cls(**kwargs)
