"""A pretraining checkpoint's encoder in timm's layout: what ``greenmim-export`` writes.

:func:`timm_encoder` reads a ``greenmim-pretrain`` checkpoint (the encoder is ``encoder.*`` of its
model, its architecture the checkpoint's resolved config) or an **official GreenMIM** one (the
reference code's ``main_pretrain.py``), whose architecture is read off its weights
(:func:`~greenmim.weights.architecture.read_architecture`) and whose encoder is converted by timm's
own ``checkpoint_filter_fn``: the same conversion ``pretrained=`` applies.
:func:`check_against_timm` checks the result loads into ``timm.create_model`` with only the head missing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..engine.checkpoint import FORMAT
from ..engine.errors import UserError
from ..models.registry import timm_args, timm_takes_img_size
from .architecture import is_official_greenmim, read_architecture
from .loading import load_pretrain_checkpoint, split_pretrain_state, timm_filter, unwrap_state_dict

ENCODER_PREFIX = "encoder."
GREENMIM_ONLY_ARGS = ("cost_model", "fused_attn", "sparse_backend", "attention")


def timm_encoder(checkpoint: str) -> Tuple[str, Dict[str, Any], Dict[str, torch.Tensor], Dict[str, Any]]:
    """``(timm_name, model_args, timm-layout encoder state, description)`` of a ``greenmim-pretrain`` or an
    official GreenMIM checkpoint; anything else is a :class:`UserError` naming what was given."""
    contents = _read(checkpoint)
    official = contents is not None and contents.get("format") != FORMAT and isinstance(contents.get("model"), dict)
    if official and is_official_greenmim(contents["model"]):
        return official_encoder(checkpoint, contents)
    ckpt = load_pretrain_checkpoint(checkpoint, contents=contents)
    config = ckpt["config"]
    info = {"step": int(ckpt["step"]), "method": config["model"].get("method")}
    return config["model"]["name"], timm_model_args(config), encoder_state_dict(ckpt), info


def timm_model_args(config: Dict[str, Any]) -> Dict[str, Any]:
    """The ``timm.create_model`` keyword arguments that rebuild the pretrained encoder's architecture."""
    args = {k: v for k, v in timm_args(config["model"].get("encoder_args")).items() if k not in GREENMIM_ONLY_ARGS}
    args.pop("drop_path_rate", None)  # a training choice, not architecture
    img = config["data"]["img_size"]
    if img is not None and timm_takes_img_size(config["model"]["name"]):  # timm's PVTv2 takes none
        args["img_size"] = img
    return args


def encoder_state_dict(ckpt: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The encoder's tensors with timm's names (``encoder.`` prefix removed, contiguous, CPU)."""
    state = {k[len(ENCODER_PREFIX):]: v for k, v in ckpt["model"].items() if k.startswith(ENCODER_PREFIX)}
    if not state:
        raise UserError("the checkpoint has no encoder weights (no 'encoder.*' keys): is it a greenmim pretraining checkpoint?")
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _read(path: str) -> Optional[Dict[str, Any]]:
    """The contents of ``path`` (a dict), or None when it is missing, unreadable or not a dict (the
    greenmim checkpoint reader then says why)."""
    if not Path(path).is_file():
        return None
    try:
        contents = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        return None
    return contents if isinstance(contents, dict) else None


def official_encoder(path: str, contents: Dict[str, Any]) -> Tuple[str, Dict[str, Any], Dict[str, torch.Tensor], Dict[str, Any]]:
    """``(timm_name, model_args, timm-layout encoder state, description)`` of an official GreenMIM checkpoint:
    the architecture read off its weights, the encoder converted by timm's filter (see the module notes)."""
    import timm

    arch = read_architecture(path, contents)
    if arch is None:
        raise UserError(f"{path} is an official GreenMIM checkpoint whose encoder is not a Swin: only Swin encoders are converted")
    args = dict(arch.encoder_args, **({"img_size": arch.img_size} if arch.img_size else {}))
    encoder, _, _ = split_pretrain_state(unwrap_state_dict(contents))
    with torch.device("meta"):
        model = timm.create_model(arch.name, pretrained=False, **args)
    state = {k: v.detach().cpu().contiguous() for k, v in timm_filter(encoder, model).items()}
    info = {"step": None, "epoch": contents.get("epoch"), "method": "greenmim",
            "source": "official GreenMIM checkpoint (architecture read off its weights)"}
    return arch.name, args, state, info


def check_against_timm(name: str, args: Dict[str, Any], state: Dict[str, torch.Tensor]) -> None:
    """Raise if ``state`` does not load into ``timm.create_model(name, **args)`` with only the head missing."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **args)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith("head")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise UserError(
            f"exported weights do not match timm's {name}: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"shape mismatch {wrong[:3]}"
        )


