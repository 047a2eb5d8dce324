"""The CLIs' one check of a composed config, run before anything is built or written.

The ranges and choices of every key are :mod:`greenmim.engine.config`'s table
(:func:`~greenmim.engine.config.check_values`); this hook adds the checks that need a model or data
room, which the engine may not import: the architecture of ``model.name`` with its
``encoder_args``, the decoder's heads, the mask ratio against the image's unit grid (pretraining),
``data.decode`` (pretraining) and ``detector.maskrcnn`` (detection). Each raises
:class:`~greenmim.engine.errors.ConfigError` with one line naming the key, the value and the fix.
"""
from __future__ import annotations

from omegaconf import DictConfig

from ..engine.config import MISSING, check_grad_checkpointing, check_maskrcnn, check_values, value_of
from ..engine.errors import ConfigError

__all__ = ["check_config", "check_model", "check_grad_checkpointing"]


def check_model(cfg: DictConfig) -> None:
    """The architecture of ``model.name`` with ``model.encoder_args`` (sizes >= 1, one value per stage,
    heads dividing widths) and the decoder's ``decoder_heads`` dividing ``decoder_dim``."""
    from ..models import check_architecture

    name = value_of(cfg, "model.name")
    if isinstance(name, str) and name != "???":
        try:
            args = value_of(cfg, "model.encoder_args")
            check_architecture(name, None if args is MISSING else args)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    dim, heads = value_of(cfg, "model.decoder_dim"), value_of(cfg, "model.decoder_heads")
    if isinstance(dim, int) and isinstance(heads, int) and heads > 0 and dim % heads:
        divisors = [h for h in (1, 2, 4, 8, 16, 32) if dim % h == 0]
        raise ConfigError(f"model.decoder_heads={heads} does not divide model.decoder_dim={dim}: use one of {', '.join(map(str, divisors))} (or change decoder_dim)")


def check_pretrain(cfg: DictConfig) -> None:
    """The mask ratio must leave at least one masked and one visible unit of the image's unit grid;
    ``data.decode`` is one of the decode modes."""
    from ..data import check_decode
    from ..plan.masking import check_mask_ratio
    from ..models.registry import mask_unit

    check_decode(cfg.data.decode)
    name = value_of(cfg, "model.name")
    if name in (MISSING, None, "???"):
        return
    try:
        unit = mask_unit(name, value_of(cfg, "model.encoder_args"))
    except ValueError:  # an unknown model name: reported when the model is built, with a did-you-mean
        return
    check_mask_ratio(cfg.model.mask_ratio, value_of(cfg, "data.img_size"), unit)


TASK_CHECKS: dict = {"pretrain": (check_pretrain,), "finetune": (), "detect": (check_maskrcnn,)}


def check_config(cfg: DictConfig, task: str) -> None:
    """Every check of a composed ``task`` config; raises :class:`ConfigError` at the first violation."""
    check_values(cfg)
    check_model(cfg)
    for check in TASK_CHECKS[task]:
        check(cfg)
