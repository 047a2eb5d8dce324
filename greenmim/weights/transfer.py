"""The timm architecture of a ``model`` config, for the models that receive pretrained weights."""
from __future__ import annotations

from typing import Any, Dict, Mapping

from ..engine.errors import ConfigError
from ..models.registry import get_spec, timm_args


def transfer_kwargs(name: str, encoder_args: Mapping[str, Any], task: str) -> Dict[str, Any]:
    """timm constructor arguments from ``model.encoder_args`` (the architecture, as in pretraining):
    null values (timm's default) are dropped, lists become tuples and greenmim-only options (``cost_model``, ``sparse_backend``, ...) are dropped.
    The downstream task sets its own stochastic depth: ``drop_path_rate`` in ``encoder_args`` is a
    :class:`ConfigError` naming ``model.drop_path_rate`` (``task`` names the task in the message)."""
    args = timm_args(encoder_args)
    if "drop_path_rate" in args:
        raise ConfigError(f"set the {task} drop path with model.drop_path_rate, not model.encoder_args.drop_path_rate")
    try:
        greenmim_only = get_spec(name).visible_only_kwargs
    except ValueError:  # a timm name greenmim does not pretrain: nothing to drop
        greenmim_only = ()
    return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if k not in greenmim_only}
