"""Model registry: timm backbone names -> visible-only (greenmim) and all-token (simmim) encoders.

Each entry records the timm architecture arguments of a name (the same ones timm's entrypoint
uses), so the encoders built here have timm's parameter names and layouts and load timm weights
without any conversion.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Type

import torch.nn as nn

from ..ops.group_attention import ATTENTION_BACKENDS

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
    visible_only_kwargs: tuple = field(default=("cost_model", "fused_attn", "sparse_backend", "attention"))
    # timm's constructor takes img_size (Swin, Twins); PVTv2's does not (the encoders take it for their unit grid)
    timm_img_size: bool = True


_REGISTRY: Dict[str, EncoderSpec] = {}
_REFUSED: Dict[str, str] = {}  # timm names greenmim cannot pretrain -> why, and what to use instead


def register_encoder(spec: EncoderSpec) -> None:
    _REGISTRY[spec.name] = spec


def refuse_encoder(name: str, reason: str) -> None:
    """Make ``get_spec(name)`` fail with ``reason`` (a timm name of a registered family that cannot run visible-only)."""
    _REFUSED[name] = reason


def list_encoders(family: str = "") -> List[str]:
    """Registered encoder names (timm model names), optionally of one family ('swin', 'twins', 'pvt_v2')."""
    return sorted(n for n, s in _REGISTRY.items() if not family or s.family == family)


def get_spec(name: str) -> EncoderSpec:
    if name in _REFUSED:
        raise UnknownModelError(f"model '{name}' is not supported: {_REFUSED[name]}")
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UnknownModelError(f"unknown model '{name}': {hint}available: {', '.join(list_encoders())}")
    return _REGISTRY[name]


def timm_takes_img_size(name: str) -> bool:
    """Whether ``timm.create_model(name)`` takes ``img_size`` (True for names greenmim does not register)."""
    spec = _REGISTRY.get(name)
    return spec is None or spec.timm_img_size


def create_encoder(name: str, method: str = "greenmim", **overrides: Any) -> nn.Module:
    """Build the encoder for a timm Swin/Twins/PVTv2 name.

    ``method="greenmim"``: the visible-only encoder, ``encoder(images, mask) -> (B, N_vis, C)``.
    ``method="simmim"``: the all-token baseline, ``encoder(images, mask, mask_token) -> (B, num_units, C)``.
    ``overrides`` are timm's constructor arguments (``img_size``, ``window_size``, ``embed_dim``,
    ``depths``, ``num_heads``, ``drop_path_rate``, ...) plus the greenmim options ``cost_model``,
    ``fused_attn``, ``sparse_backend`` and ``attention`` (``"sdpa"`` | ``"flex"``: the windowed
    attention's implementation). The classifier head is never built (``num_classes=0``).
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


def timm_args(encoder_args: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The constructor arguments a ``model.encoder_args`` node sets: its non-null values.

    The model configs declare every architecture key (``configs/model/arch/``) with ``null`` meaning
    "the timm default of the name", so that ``model.encoder_args.window_size=14`` works without ``+``;
    every consumer of ``encoder_args`` reads it through this function.
    """
    return {k: v for k, v in dict(encoder_args or {}).items() if v is not None}


#: the input size of a timm model whose arguments name none
TIMM_IMG_SIZE = 224

#: the patch embedding's stride of a family whose timm arguments name none (PVTv2: an overlapping stride-4 stem)
STEM_STRIDE = 4


def mask_unit(name: str, encoder_args: Optional[Mapping[str, Any]] = None) -> int:
    """The mask unit (total stride, px) of ``name`` with ``encoder_args``: ``patch_size * 2 ** (stages - 1)``."""
    args = {**get_spec(name).args, **timm_args(encoder_args)}
    patch = args["patch_size"] if "patch_size" in args else STEM_STRIDE
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return int(patch) * 2 ** (len(args["depths"]) - 1)


def _positive_ints(value: Any) -> bool:
    items = value if isinstance(value, (list, tuple)) else [value]
    return bool(items) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items)


def _positive_numbers(value: Any) -> bool:
    items = value if isinstance(value, (list, tuple)) else [value]
    return bool(items) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in items)


def check_architecture(name: str, encoder_args: Optional[Mapping[str, Any]]) -> None:
    """Raise ``ValueError`` (one line naming the key and the fix) when ``encoder_args`` over the
    registered timm arguments of ``name`` cannot build: a size below 1, per-stage lists of different
    lengths, or a stage width that its head count does not divide. Unregistered names are not checked."""
    if name not in _REGISTRY:
        return
    given = timm_args(encoder_args)
    args = {**_REGISTRY[name].args, **given}

    def fail(key: str, what: str) -> None:
        raise ValueError(f"model.encoder_args.{key}={given.get(key, args.get(key))!r} is invalid: {what}")

    for key in ("window_size", "patch_size", "embed_dim", "depths", "num_heads", "embed_dims", "sr_ratios", "wss"):
        if key in args and args[key] is not None and not _positive_ints(args[key]):
            fail(key, "set it to a positive integer" + ("" if key in ("window_size", "patch_size", "embed_dim") else " per stage, e.g. [2, 2, 6, 2]"))
    for key in ("mlp_ratio", "mlp_ratios"):
        if key in args and not _positive_numbers(args[key]):
            fail(key, "set it to a positive number" + (" per stage" if key == "mlp_ratios" else ""))
    if "attention" in given and given["attention"] not in ATTENTION_BACKENDS:
        fail("attention", f"choose one of {', '.join(ATTENTION_BACKENDS)} (sdpa: the default; flex: FlexAttention)")
    rate = args["drop_path_rate"] if "drop_path_rate" in args else None  # absent: timm's default, nothing to check
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0):
        fail("drop_path_rate", "set it to a number in [0, 1)")
    stages = len(args["depths"]) if isinstance(args["depths"], (list, tuple)) else 1
    for key in ("num_heads", "embed_dims", "mlp_ratios", "sr_ratios", "wss"):
        if isinstance(args.get(key), (list, tuple)) and len(args[key]) != stages:
            fail(key, f"give one value per stage ({stages} stages: model.encoder_args.depths has {stages} entries)")
    heads = args["num_heads"] if isinstance(args["num_heads"], (list, tuple)) else [args["num_heads"]] * stages
    widths = args["embed_dims"] if "embed_dims" in args else [args["embed_dim"] * 2 ** i for i in range(stages)]  # Swin doubles per stage
    bad = [] if args.get("head_dim") else [i for i, (w, h) in enumerate(zip(widths, heads)) if w % h]  # Swin's head_dim frees the heads
    if bad:
        i = bad[0]
        key = "num_heads" if "num_heads" in given else ("embed_dims" if "embed_dims" in args else "embed_dim")
        fail(key, f"stage {i} has width {widths[i]} and {heads[i]} heads: the heads must divide the width")
