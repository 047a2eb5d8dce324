"""The architecture a checkpoint was trained with, so that ``pretrained=`` and ``resume=`` carry it.

:func:`read_architecture` tells it from the checkpoint itself, without ``model=``:

* a **greenmim checkpoint** (pretraining, fine-tuning or detection, and ``best.pt``): its stored
  resolved config (``config.model``, ``config.data.img_size``);
* a **greenmim-export** ``.safetensors``: its description (the ``<file>.json`` sidecar, else the
  file's ``greenmim`` metadata), which names the timm model and its constructor arguments;
* any other **Swin** state dict, in timm's or the official layout, e.g. an **official GreenMIM**
  ``checkpoint-*.pth`` (``main_pretrain.py``: ``model`` holds ``encoder.*`` and ``decoder_*``):
  read off the weights (:func:`swin_architecture`: embed width, depths, heads, window, patch size,
  MLP ratio; the image size from the decoder's position table).

:func:`effective_args` and :func:`shape_differences` compare an architecture with a ``model``
config: the keys whose values change tensor shapes (a window size does not: timm resizes the
relative-position tables).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch

from ..engine.config import stored_config
from ..models.registry import UnknownModelError, get_spec, timm_args

#: ``encoder_args`` keys that are not architecture (greenmim-only options, stochastic depth)
NOT_ARCHITECTURE = ("cost_model", "fused_attn", "sparse_backend", "drop_path_rate")
#: ``encoder_args`` keys whose value does not change any tensor's shape (timm adapts the weights)
SHAPE_FREE = ("window_size", "wss", "img_size")
#: keys of an official GreenMIM / MAE-style pretraining model outside its ``encoder.*``
OFFICIAL_PRETRAIN_ONLY = ("decoder_", "mask_token")
_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")


@dataclass
class Architecture:
    """A checkpoint's architecture as a greenmim ``model`` config: ``name`` (timm), ``encoder_args``
    (timm constructor arguments, architecture keys only), ``img_size`` (the pretraining size, or
    None), ``method`` (greenmim | simmim for pretraining checkpoints), ``source`` (how it was told:
    "stored config" | "export description" | "weights") and, for greenmim checkpoints, the whole
    stored ``model`` node (``model``) and ``task``."""

    name: str
    encoder_args: Dict[str, Any]
    img_size: Any = None
    method: Optional[str] = None
    source: str = "weights"
    model: Dict[str, Any] = field(default_factory=dict)
    task: Optional[str] = None

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.encoder_args.items())
        return f"{self.name}({args})" + (f" at {self.img_size} px" if self.img_size else "")


def is_official_greenmim(state: Mapping[str, Any]) -> bool:
    """Whether a state dict is the reference code's pretraining model: ``encoder.*`` next to ``decoder_*``."""
    return any(k.startswith("encoder.") for k in state) and any(k.startswith(OFFICIAL_PRETRAIN_ONLY) for k in state)


def architecture_keys(encoder_args: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The non-null architecture keys of an ``encoder_args`` node (lists as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in timm_args(encoder_args).items() if k not in NOT_ARCHITECTURE}


def effective_args(name: str, encoder_args: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The full timm architecture of ``name`` with ``encoder_args`` over it (registered names' defaults)."""
    try:
        base = dict(get_spec(name).args)
    except UnknownModelError:
        base = {}
    base.update(architecture_keys(encoder_args))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in base.items() if k not in NOT_ARCHITECTURE}


def shape_differences(arch: Architecture, name: str, encoder_args: Optional[Mapping[str, Any]]) -> List[str]:
    """``["model.encoder_args.embed_dim: checkpoint 16, this run 32", ...]``: the keys whose values differ
    between ``arch`` and a ``model`` config and change tensor shapes (a family change is ``model.name``)."""
    ours, theirs = effective_args(name, encoder_args), effective_args(arch.name, arch.encoder_args)
    if _family(name) != _family(arch.name):
        return [f"model.name: checkpoint {arch.name}, this run {name}"]
    return [f"model.encoder_args.{k}: checkpoint {theirs.get(k)}, this run {ours.get(k)}"
            for k in sorted(set(ours) | set(theirs)) if k not in SHAPE_FREE and k in ours and k in theirs and ours[k] != theirs[k]]


def _family(name: str) -> str:
    return name.split("_", 1)[0]


# -- reading ----------------------------------------------------------------------------------------
def read_architecture(path: str, raw: Optional[Mapping[str, Any]] = None) -> Optional[Architecture]:
    """The architecture of the checkpoint at ``path`` (``raw``: its contents, if already read), or None
    when it records none and its weights are not a Swin (e.g. a plain Twins state dict)."""
    if str(path).endswith(".safetensors"):
        found = _export_description(str(path))
        if found is not None:
            return found
    if raw is None:
        from .loading import read_checkpoint

        raw = read_checkpoint(str(path))
    config = stored_config(raw)
    if isinstance(config.get("model"), Mapping) and config["model"].get("name"):
        model = dict(config["model"])
        img = stored_config(raw, "data").get("img_size")
        return Architecture(str(model["name"]), architecture_keys(model.get("encoder_args")), img_size=img,
                            method=model.get("method"), source="stored config", model=model, task=config.get("task"))
    from .loading import unwrap_state_dict

    state = unwrap_state_dict(raw)
    official = is_official_greenmim(state)
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")} or state
    for prefix in ("backbone.trunk.model.",):  # a detector's trunk
        if any(k.startswith(prefix) for k in state):
            encoder = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    arch = swin_architecture(encoder)
    if arch is None:
        return None
    if official:
        arch.method = "greenmim"
        arch.img_size = _official_img_size(state, arch, raw)
    return arch


def export_metadata(f: Any) -> Any:
    """The export description in an open safetensors file's metadata (its ``greenmim`` entry, JSON), or None."""
    metadata = f.metadata() or {}
    return json.loads(metadata["greenmim"]) if "greenmim" in metadata else None


def _export_description(path: str) -> Optional[Architecture]:
    """A greenmim-export's description: the ``<file>.json`` sidecar, else the safetensors metadata."""
    info = None
    sidecar = path + ".json"
    if os.path.isfile(sidecar):
        try:
            with open(sidecar, encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, ValueError):
            info = None
    if not isinstance(info, dict):
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                info = export_metadata(f)
        except Exception:  # not a readable safetensors file: read_checkpoint reports it
            return None
    if not isinstance(info, dict) or not info.get("timm_name") or not isinstance(info.get("model_args"), dict):
        return None  # not a description greenmim-export wrote
    args = dict(info["model_args"])
    img = args.pop("img_size", None)
    return Architecture(str(info["timm_name"]), architecture_keys(args), img_size=img, method=info.get("method"),
                        source="export description")


def swin_architecture(state: Mapping[str, torch.Tensor]) -> Optional[Architecture]:
    """A Swin's architecture read off its weights (timm or official layout, no prefix), or None.

    ``embed_dim``: the patch embedding's output channels; ``patch_size``: its kernel; ``depths``: the
    blocks per stage; ``num_heads``: the relative-position tables' columns; ``window_size``: from
    stage 1's table, ``(2w - 1)^2`` rows; ``mlp_ratio``: the first MLP's width over ``embed_dim``.
    """
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return None
    blocks: Dict[int, set] = {}
    for k in state:
        m = _BLOCK.match(k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        return None
    stages = len(blocks)
    depths = [len(blocks[i]) for i in range(stages)]
    try:
        heads = [int(state[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1]) for i in range(stages)]
        rows = int(state["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0])
        hidden = int(state["layers.0.blocks.0.mlp.fc1.weight"].shape[0])
    except KeyError:  # not a Swin V1 (e.g. a Swin V2's continuous position bias)
        return None
    embed = int(proj.shape[0])
    window = (int(round(math.sqrt(rows))) + 1) // 2
    args: Dict[str, Any] = {"patch_size": int(proj.shape[-1]), "embed_dim": embed, "depths": depths, "num_heads": heads,
                            "window_size": window}
    if hidden != 4 * embed:
        args["mlp_ratio"] = hidden / embed
    return Architecture(_closest_swin_name(args), args, source="weights")


def _closest_swin_name(args: Mapping[str, Any]) -> str:
    """A registered Swin name with the same width and depths (its window aside), else Swin-T's: the
    arguments are always given in full, so the name only picks timm's defaults for the rest."""
    from ..models.swin import SWIN_ARCHS

    for name, base in SWIN_ARCHS.items():
        if base["embed_dim"] == args["embed_dim"] and list(base["depths"]) == list(args["depths"]) and base["window_size"] == args["window_size"]:
            return name
    for name, base in SWIN_ARCHS.items():
        if base["embed_dim"] == args["embed_dim"] and list(base["depths"]) == list(args["depths"]):
            return name
    return "swin_tiny_patch4_window7_224"


def _official_img_size(state: Mapping[str, torch.Tensor], arch: Architecture, raw: Mapping[str, Any]) -> Optional[int]:
    """The pretraining image size of an official GreenMIM checkpoint: the decoder's position table has
    one row per mask unit (the encoder's total stride); else ``args.input_size``."""
    pos = state.get("decoder_pos_embed")
    if pos is not None and pos.ndim == 3:
        side = int(round(math.sqrt(pos.shape[1])))
        if side * side == pos.shape[1]:
            return side * arch.encoder_args["patch_size"] * 2 ** (len(arch.encoder_args["depths"]) - 1)
    size = getattr(raw.get("args"), "input_size", None)
    return int(size) if isinstance(size, int) else None
