"""Layer-wise learning-rate decay for timm's Swin, Twins and PVTv2 classifiers (BEiT / SimMIM recipe).

Every parameter gets a depth ``d`` in ``0 .. L+1`` (``L = sum(depths)``, the number of blocks) and the
learning-rate scale ``layer_decay ** (L + 1 - d)``:

* 0: the stem (Swin ``patch_embed``, ``absolute_pos_embed``; Twins ``patch_embeds.0``);
* ``sum(depths[:i]) + j + 1``: block ``j`` of stage ``i`` (Swin ``layers.i.blocks.j``, Twins ``blocks.i.j``);
* ``sum(depths[:i])``: the transition into stage ``i > 0`` (Swin ``layers.i.downsample``, Twins
  ``patch_embeds.i``), i.e. the depth of the last block of stage ``i - 1``, whose output it consumes;
* ``sum(depths[:i]) + 1``: Twins' PEG ``pos_block.i`` (it runs right after block 0 of stage ``i``);
* ``L + 1`` (scale 1): the final ``norm`` and the classifier ``head``.

PVTv2 (``stages.i.{downsample,blocks.j,norm}``) follows the same rule: its stem ``patch_embed`` at 0,
``stages.i.downsample`` as a transition, a stage's own ``norm`` at the depth of its last block (the
last stage's norm is the final norm: ``L + 1``).

This is SimMIM's ``get_swin_layer`` rule, written for timm's layout (timm moved Swin's patch merging
from the end of a stage to the start of the next one, so the index shifts by one). timm's own
``param_groups_layer_decay`` with the models' ``group_matcher`` differs in two places: it puts a
stage transition at the depth of the *next* stage's first block, and the final norm at the depth
of the last block (scale ``layer_decay`` instead of 1). The published SimMIM/GreenMIM numbers were
obtained with the rule above, so it is the one used here; other timm models fall back to timm's
``param_groups_layer_decay``.

Weight decay: none for 1-D tensors (norms, biases) and the model's ``no_weight_decay()`` set (Swin:
relative-position bias tables; Twins: the PEG convolutions), as in SimMIM and timm.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Sequence

import torch.nn as nn
from timm.models.swin_transformer import SwinTransformer
from timm.models.pvt_v2 import PyramidVisionTransformerV2
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.twins import Twins


def _stage_start(depths: Sequence[int], i: int) -> int:
    return sum(depths[:i])


def swin_layer_id(name: str, depths: Sequence[int]) -> int:
    """Depth of a timm Swin parameter (see the module table)."""
    top = sum(depths) + 1
    if name.startswith(("patch_embed.", "absolute_pos_embed")):
        return 0
    m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", name)
    if m:
        return _stage_start(depths, int(m.group(1))) + int(m.group(2)) + 1
    m = re.match(r"layers\.(\d+)\.downsample\.", name)
    if m:
        return _stage_start(depths, int(m.group(1)))
    if name.startswith(("norm.", "head.")):
        return top
    raise ValueError(f"no layer-decay depth for Swin parameter '{name}'")


def twins_layer_id(name: str, depths: Sequence[int]) -> int:
    """Depth of a timm Twins parameter (see the module table)."""
    top = sum(depths) + 1
    m = re.match(r"patch_embeds\.(\d+)\.", name)
    if m:
        return _stage_start(depths, int(m.group(1)))  # 0 for the stem
    m = re.match(r"blocks\.(\d+)\.(\d+)\.", name)
    if m:
        return _stage_start(depths, int(m.group(1))) + int(m.group(2)) + 1
    m = re.match(r"pos_block\.(\d+)\.", name)
    if m:
        return _stage_start(depths, int(m.group(1))) + 1
    if name.startswith(("norm.", "head.")):
        return top
    raise ValueError(f"no layer-decay depth for Twins parameter '{name}'")


def pvt_v2_layer_id(name: str, depths: Sequence[int]) -> int:
    """Depth of a timm PVTv2 parameter (see the module table)."""
    top = sum(depths) + 1
    if name.startswith("patch_embed."):
        return 0
    m = re.match(r"stages\.(\d+)\.downsample\.", name)
    if m:
        return _stage_start(depths, int(m.group(1)))
    m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", name)
    if m:
        return _stage_start(depths, int(m.group(1))) + int(m.group(2)) + 1
    m = re.match(r"stages\.(\d+)\.norm\.", name)
    if m:
        i = int(m.group(1))
        return top if i == len(depths) - 1 else _stage_start(depths, i + 1)
    if name.startswith("head."):
        return top
    raise ValueError(f"no layer-decay depth for PVTv2 parameter '{name}'")


def layer_id_fn(model: nn.Module) -> Optional[Callable[[str], int]]:
    """The depth function of a Swin (V1 or V2: the same layout) or Twins model, or ``None`` for other architectures."""
    if isinstance(model, (SwinTransformer, SwinTransformerV2)):
        depths = [len(layer.blocks) for layer in model.layers]
        return lambda n: swin_layer_id(n, depths)
    if isinstance(model, Twins):
        depths = [len(stage) for stage in model.blocks]
        return lambda n: twins_layer_id(n, depths)
    if isinstance(model, PyramidVisionTransformerV2):
        depths = [len(stage.blocks) for stage in model.stages]
        return lambda n: pvt_v2_layer_id(n, depths)
    return None


def layer_map(model: nn.Module) -> Dict[str, int]:
    """``{parameter name: depth}`` for every trainable parameter of a Swin/Twins model."""
    fn = layer_id_fn(model)
    if fn is None:
        raise ValueError(f"layer-wise decay rule is defined for Swin, Twins and PVTv2, not {type(model).__name__}")
    return {n: fn(n) for n, p in model.named_parameters() if p.requires_grad}


def param_groups_layer_decay(
    model: nn.Module,
    weight_decay: float = 0.05,
    layer_decay: float = 0.9,
    no_weight_decay_list: Sequence[str] = (),
) -> List[dict]:
    """Optimizer parameter groups with ``lr_scale`` (layer decay) and ``weight_decay``.

    Each group is ``{"params", "weight_decay", "lr_scale", "name"}``; the learning-rate schedule
    multiplies its value by ``lr_scale`` per group. Swin and Twins use the rule of this module;
    other timm models use timm's ``param_groups_layer_decay`` (its ``group_matcher``).
    """
    skip = set(no_weight_decay_list)
    if hasattr(model, "no_weight_decay"):
        skip |= set(model.no_weight_decay())
    fn = layer_id_fn(model)
    if fn is None:
        from timm.optim import param_groups_layer_decay as timm_groups

        return timm_groups(model, weight_decay=weight_decay, no_weight_decay_list=tuple(skip), layer_decay=layer_decay)

    top = layer_map(model)
    num_layers = max(top.values()) + 1
    groups: Dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name in skip
        depth = fn(name)
        key = f"layer_{depth}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {
                "name": key,
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (num_layers - 1 - depth),
            }
        groups[key]["params"].append(param)
    return list(groups.values())
