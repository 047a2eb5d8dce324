"""Load pretrained weights into a timm classifier, reporting exactly what was (not) loaded.

Four sources are understood, told apart by their contents:

* a **greenmim pretraining checkpoint** (``greenmim-pretrain``'s ``.pt``): the model state holds
  ``encoder.*`` (timm layout), ``decoder.*`` and, for the simmim baseline, ``enc_mask_token``; the
  encoder is taken with its prefix stripped, the pretraining-only keys are listed as ``ignored``;
* an **official GreenMIM checkpoint** (the reference code's ``main_pretrain.py``: ``{"model": ...}``
  with ``encoder.*`` in the official Swin layout, ``decoder_*`` and ``mask_token``): the same, and
  timm's filter (below) converts the official layout;
* an **exported encoder** (``greenmim-export``'s ``.safetensors``): timm's layout without a head;
* a **plain timm / original checkpoint** (``.pth``, ``.bin``, ``.safetensors``), with or without a
  classifier head, also wrapped in ``{"model": ...}`` / ``{"state_dict": ...}`` / ``module.`` (DDP).

The weights then pass through the model family's own timm ``checkpoint_filter_fn`` (Swin: resize
relative-position bias tables when the window size differs, resample the patch embedding, drop
non-persistent buffers, convert the original Microsoft layout), exactly as
``timm.create_model(..., pretrained=True)`` would. A classifier head whose shape does not fit the
model (another class count) is dropped and re-initialised. After that, only the classifier head
may be missing: any other missing, unexpected or mis-shaped key is an error that lists the keys.
"""
from __future__ import annotations

import logging
import os
import pickle
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from ..engine.errors import UserError
from .architecture import OFFICIAL_PRETRAIN_ONLY, is_official_greenmim

_logger = logging.getLogger(__name__)

#: pretraining-only parameters (everything not under ``encoder.``) of a greenmim/simmim checkpoint
#: (``decoder.``, ``enc_mask_token``) and of an official GreenMIM one (``decoder_*``, ``mask_token``).
PRETRAIN_ONLY_PREFIXES = ("decoder.", "enc_mask_token", *OFFICIAL_PRETRAIN_ONLY)
#: containers a checkpoint's weights may sit in, in the order they are tried.
STATE_KEYS = ("model", "state_dict", "module")
EMA_STATE_KEYS = ("model_ema", "state_dict_ema", "ema")


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did. ``missing`` holds classifier-head keys only (else it raised)."""

    source: str
    kind: str  # "greenmim-pretrain" | "official-greenmim-pretrain" | "greenmim-classifier" | "greenmim-checkpoint" | "safetensors" | "state-dict"
    loaded: int = 0
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)  # pretraining-only keys (decoder, mask token)
    resized: List[str] = field(default_factory=list)  # tensors reshaped by timm's filter (rel-pos tables, patch embed)
    head_dropped: List[str] = field(default_factory=list)  # checkpoint head keys whose shape did not fit

    def summary(self) -> str:
        parts = [f"loaded {self.loaded} tensors from {self.source} ({self.kind})"]
        if self.missing:
            parts.append(f"missing (re-initialised): {', '.join(self.missing)}")
        if self.head_dropped:
            parts.append(f"checkpoint head dropped (class count differs): {', '.join(self.head_dropped)}")
        if self.resized:
            parts.append(f"resized: {_short(self.resized)}")
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)} pretraining-only tensors ({_prefixes(self.ignored)})")
        if self.unexpected:
            parts.append(f"unexpected: {_short(self.unexpected)}")
        return "; ".join(parts)

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def _short(keys: List[str], n: int = 8) -> str:
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _prefixes(keys: List[str]) -> str:
    return ", ".join(sorted({k.split(".")[0] + ("." if "." in k else "") for k in keys}))


# -- reading ----------------------------------------------------------------------------------------
def read_checkpoint(path: str) -> Mapping[str, Any]:
    """The raw contents of a ``.safetensors`` file or a ``torch.save`` file, on the CPU.

    ``torch.save`` files are opened with ``weights_only=True`` first; training checkpoints also hold
    RNG states and the resolved config, so on failure they are re-read with ``weights_only=False``
    (only load checkpoints you trust).
    """
    if os.path.isdir(path):
        from ..engine.checkpoint import list_checkpoints

        newest = list_checkpoints(path) or list_checkpoints(os.path.dirname(os.path.abspath(path)))
        hint = f"e.g. the newest checkpoint inside, {newest[0]}" if newest else "e.g. a run's checkpoints/step-*.pt"
        raise UserError(f"'{path}' is a folder, not a checkpoint file: pass a file to pretrained= (or checkpoint=), {hint}")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint file '{path}' does not exist: check the path given to pretrained= (or checkpoint=)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            _logger.debug("%s holds non-tensor objects; re-reading with weights_only=False", path)
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise UserError(f"cannot read checkpoint '{path}' ({type(exc).__name__}: {exc}); is it a complete torch/safetensors file?") from exc


def load_pretrain_checkpoint(path: str, contents: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A ``greenmim-pretrain`` checkpoint (with its resolved config); a fine-tune or detection
    checkpoint, or one without a config, is a :class:`UserError` naming what was given.
    ``contents``: the file's contents if already read."""
    from ..engine.checkpoint import load_checkpoint
    from ..engine.config import stored_config

    ckpt = load_checkpoint(path, contents=contents)
    config = stored_config(ckpt)
    task = config.get("task")
    if task not in (None, "pretrain"):
        raise UserError(f"{path} is a greenmim-{task} checkpoint: pass a greenmim-pretrain checkpoint (checkpoints/step-*.pt of a pretraining run)")
    if "model" not in config or "data" not in config:
        raise UserError(f"{path} has no resolved config; it was not written by greenmim-pretrain")
    return ckpt


def unwrap_state_dict(ckpt: Mapping[str, Any], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The tensor dictionary inside a checkpoint (``model`` / ``state_dict`` / EMA containers, ``module.`` prefix)."""
    state: Any = ckpt
    keys = EMA_STATE_KEYS if use_ema else STATE_KEYS
    if use_ema and isinstance(ckpt.get("task_shared"), Mapping):  # a greenmim training checkpoint's EMA
        state = ckpt["task_shared"]
    for key in keys:
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    else:
        if use_ema:
            raise UserError(f"the checkpoint holds no EMA weights (looked for {', '.join(EMA_STATE_KEYS)}); drop use_ema")
    if not isinstance(state, Mapping) or not any(torch.is_tensor(v) for v in state.values()):
        raise UserError("the checkpoint holds no model weights (expected a state dict or one under 'model'/'state_dict')")
    state = {k: v for k, v in state.items() if torch.is_tensor(v)}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def split_pretrain_state(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str], bool]:
    """``(encoder_state, ignored_keys, is_pretrain)``: strip ``encoder.`` from a greenmim pretraining state."""
    if not any(k.startswith("encoder.") for k in state):
        return state, [], False
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    ignored = [k for k in state if not k.startswith("encoder.")]
    strays = [k for k in ignored if not k.startswith(PRETRAIN_ONLY_PREFIXES)]
    if strays:
        raise UserError(f"unexpected keys next to 'encoder.*' in the pretraining checkpoint: {_short(strays)}")
    return encoder, ignored, True


# -- filtering --------------------------------------------------------------------------------------
def classifier_prefix(model: nn.Module) -> str:
    """The classifier's module path (timm's ``pretrained_cfg['classifier']``, e.g. ``head.fc`` for Swin)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier") or "head"
    return name if isinstance(name, str) else name[0]


def timm_filter(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Apply the model family's timm ``checkpoint_filter_fn`` (as ``pretrained=True`` does), if it has one."""
    fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        for cls in type(model).__mro__[1:]:  # a greenmim subclass of a timm model: use the timm module's filter
            fn = getattr(sys.modules.get(cls.__module__), "checkpoint_filter_fn", None)
            if fn is not None:
                break
    return dict(fn(state, model)) if fn is not None else dict(state)


def load_pretrained(
    model: nn.Module,
    path: str,
    use_ema: bool = False,
    allow_missing_head: bool = True,
    checkpoint: Optional[Mapping[str, Any]] = None,
) -> LoadReport:
    """Load a greenmim pretraining checkpoint, exported encoder or timm checkpoint into ``model``.

    ``model`` is a timm classifier (``timm.create_model(name, num_classes=K, ...)``). Returns a
    :class:`LoadReport`; raises :class:`~greenmim.engine.errors.UserError` naming the offending keys
    when anything other than the classifier head (or, with ``allow_missing_head=False``, anything
    at all) is missing, unexpected or of the wrong shape. ``checkpoint``: the already-read contents
    of ``path``. ``use_ema``: take the EMA weights (``model_ema``, ``state_dict_ema``, ``ema`` or a
    greenmim training checkpoint's ``task_shared.ema``).
    """
    raw = checkpoint if checkpoint is not None else read_checkpoint(path)
    state = unwrap_state_dict(raw, use_ema=use_ema)
    official = is_official_greenmim(state)
    state, ignored, is_pretrain = split_pretrain_state(state)
    kind = "official-greenmim-pretrain" if official else "greenmim-pretrain" if is_pretrain else str(raw.get("format") or ("safetensors" if path.endswith(".safetensors") else "state-dict"))
    report = LoadReport(source=os.path.basename(path), kind=kind, ignored=ignored)

    before = {k: tuple(v.shape) for k, v in state.items()}
    try:
        state = timm_filter(state, model)
    except Exception as exc:  # timm's filters index the model by checkpoint keys (e.g. a deeper checkpoint)
        own = model.state_dict()
        unexpected = sorted(k for k in state if k not in own)
        missing = sorted(k for k in own if k not in state and not k.startswith(classifier_prefix(model) + "."))
        raise UserError(
            f"'{path}' does not fit the model (unexpected {len(unexpected)}: {_short(unexpected, 4)}; missing "
            f"{len(missing)}: {_short(missing, 4)}; timm's conversion failed with {type(exc).__name__}: {exc}): "
            "build the model with the pretraining architecture (model.name and model.encoder_args: embed_dim, depths, num_heads)"
        ) from None
    renamed = "layers.0.downsample.reduction.weight" in before  # the official Swin layout: patch merging renumbered
    report.resized = sorted(k for k, v in state.items() if k in before and tuple(v.shape) != before[k]
                            and not (renamed and ".downsample." in k))

    head = classifier_prefix(model) + "."
    own = model.state_dict()
    report.head_dropped = sorted(k for k, v in state.items() if k.startswith(head) and k in own and v.shape != own[k].shape)
    for k in report.head_dropped:
        del state[k]

    mismatched = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise UserError(
            f"{len(mismatched)} tensors of '{path}' do not fit the model: {_short(mismatched, 4)}; "
            "build the model with the pretraining architecture (model.name and model.encoder_args: embed_dim, depths, num_heads, window_size)"
        )
    result = model.load_state_dict(state, strict=False)
    report.unexpected = list(result.unexpected_keys)
    report.missing = list(result.missing_keys)
    report.loaded = len(state) - len(report.unexpected)
    bad_missing = [k for k in report.missing if not (allow_missing_head and k.startswith(head))]
    if bad_missing and not report.unexpected and all(k.startswith(head) for k in bad_missing):
        raise UserError(
            f"'{path}' holds no classifier head: it is a {kind} checkpoint (an encoder), "
            f"not a fine-tuned classifier: fine-tune it first with pretrained={path}, then evaluate the fine-tuned run's checkpoint"
        )
    if bad_missing or report.unexpected:
        problems = []
        if bad_missing:
            problems.append(f"missing {len(bad_missing)}: {_short(bad_missing)}")
        if report.unexpected:
            problems.append(f"unexpected {len(report.unexpected)}: {_short(report.unexpected)}")
        raise UserError(
            f"'{path}' does not match the classifier ({'; '.join(problems)}); only the head ({head}*) may be "
            "missing: check model.name and model.encoder_args against the pretraining config"
        )
    _logger.debug("loaded %s", report.summary())
    return report
