"""Export a Swin encoder in the official (Microsoft Swin-Transformer) key layout, for mmdetection and
detectron2 users.

greenmim's encoders, fine-tuned classifiers and detection trunks all use timm's layout. The
official layout, which the Swin detection code bases read (Swin-Transformer-Object-Detection,
mmdetection's ``SwinTransformer(convert_weights=True)``, the detectron2 Swin ports), differs in:

================================  =====================================  =================================
what                              timm (greenmim)                        official Swin
================================  =====================================  =================================
patch merging (stage transition)  ``layers.{i}.downsample.*``, i = 1..3   ``layers.{i-1}.downsample.*``
                                  (start of stage i)                     (end of stage i-1)
patch-merging channel order       ``reshape(B,H/2,2,W/2,2,C)              ``cat([x0, x1, x2, x3])`` with
                                  .permute(0,1,3,4,2,5)``                x0=(0,0) x1=(1,0) x2=(0,1) x3=(1,1)
                                                                         (row, col) offsets
relative position index           non-persistent buffer (absent)         ``layers.*.attn.relative_position_index``
shifted-window attention mask     non-persistent buffer (absent)         ``attn_mask`` in classification
                                                                         checkpoints (size-dependent, not
                                                                         exported; detection code rebuilds it)
classifier                        ``head.fc.*``                          ``head.*``
detection output norms            ``backbone.trunk.out_norms.{i}.*``      ``norm{i}.*``
================================  =====================================  =================================

Everything else (``patch_embed.proj``, ``patch_embed.norm``, ``layers.{i}.blocks.{j}.{norm1,
attn.qkv, attn.proj, attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2}``, ``norm``) has
the same name and layout. The channel order of timm's patch merging is the official one (timm's
``permute(0, 1, 3, 4, 2, 5)`` puts the column offset outside the row offset, i.e. x0, x1, x2, x3),
which is why timm's own ``checkpoint_filter_fn`` (official -> timm) only renames the
``downsample`` index and the head; this module inverts exactly that, and the tests check that
timm's filter maps the export back to the original tensors. (mmdetection's own ``PatchMerging`` uses
``nn.Unfold`` with another order; its ``swin_converter`` reorders official weights itself, so
``convert_weights=True`` is the switch to use there.)

The file written is ``{"model": state_dict}`` (as Microsoft's releases), ``torch.save`` format.
Twins' timm layout is the official one (timm's port kept the names), so Twins needs no conversion.

The command that writes such a file is :mod:`greenmim.cli.official_swin`.
"""
from __future__ import annotations

import re
from typing import Dict

import torch
from timm.models.swin_transformer import get_relative_position_index

from ..engine.errors import UserError
from .loading import split_pretrain_state

DETECTOR_TRUNK = "backbone.trunk.model."
DETECTOR_NORMS = "backbone.trunk.out_norms."
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
_NORM = re.compile(r"^norm(\d+)\.")


def timm_encoder_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The timm-layout encoder inside any greenmim checkpoint state (pretraining, detector, plain)."""
    if any(k.startswith(DETECTOR_TRUNK) for k in state):
        out = {k[len(DETECTOR_TRUNK):]: v for k, v in state.items() if k.startswith(DETECTOR_TRUNK)}
        for k, v in state.items():
            if k.startswith(DETECTOR_NORMS):
                i, rest = k[len(DETECTOR_NORMS):].split(".", 1)
                out[f"out_norms.{i}.{rest}"] = v
        return out
    encoder, _, _ = split_pretrain_state(dict(state))
    return encoder


def timm_to_official_swin(state: Dict[str, torch.Tensor], keep_head: bool = False) -> Dict[str, torch.Tensor]:
    """Rename a timm Swin state dict to the official layout (see the module table).

    Accepts ``out_norms.{i}.*`` (a detection trunk's output norms) and writes them as ``norm{i}.*``.
    Adds ``relative_position_index`` for every attention (the official code keeps it persistent).
    """
    if "layers.0.downsample.reduction.weight" in state:
        raise UserError("this state dict is already in the official Swin layout (layers.0.downsample exists)")
    out: Dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            continue
        m = _DOWNSAMPLE.match(k)
        if m:
            i = int(m.group(1))
            if i == 0:
                raise UserError(f"unexpected timm key {k}: timm's stage 0 has no patch merging")
            k = f"layers.{i - 1}.downsample." + k[m.end():]
        elif k.startswith("out_norms."):
            i, rest = k[len("out_norms."):].split(".", 1)
            k = f"norm{i}.{rest}"
        elif k.startswith("head."):
            if not keep_head:
                continue
            k = k.replace("head.fc.", "head.")
        out[k] = v
        if k.endswith("attn.relative_position_bias_table"):
            size = int(round(v.shape[0] ** 0.5))
            win = (size + 1) // 2
            out[k.replace("relative_position_bias_table", "relative_position_index")] = get_relative_position_index(win, win)
    return out


def official_to_timm_swin(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`timm_to_official_swin` (what timm's ``checkpoint_filter_fn`` does, plus
    ``norm{i}`` -> ``out_norms.{i}``), for round trips without building a model."""
    out: Dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            continue
        m = _DOWNSAMPLE.match(k)
        if m:
            k = f"layers.{int(m.group(1)) + 1}.downsample." + k[m.end():]
        elif _NORM.match(k):
            m = _NORM.match(k)
            k = f"out_norms.{m.group(1)}." + k[m.end():]
        elif k.startswith("head.") and not k.startswith("head.fc."):
            k = k.replace("head.", "head.fc.", 1)
        out[k] = v
    return out
