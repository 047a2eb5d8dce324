"""Range checks of every numeric config key, run by the CLIs before anything is built or written.

Each rule names a key (a dotted path into the composed config), the kind of value and its range; a
key absent from the config is not checked. A violation raises
:class:`~greenmim.engine.errors.ConfigError` with one line: the key, the value given and what it
must be. Task-specific checks (e.g. the mask ratio against the image's unit grid) follow the table.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..engine.config import NONFINITE_POLICIES
from ..engine.errors import ConfigError
from ..engine.precision import PRECISIONS
from ..engine.step import COMPILE_MODES

_MISSING = object()


@dataclass(frozen=True)
class Rule:
    """``key`` must be an ``int`` (``integer=True``) or a real number within ``[low, high]`` (open
    ends with ``low_open``/``high_open``); ``optional``: null allowed; ``also``: extra allowed values."""

    key: str
    integer: bool = False
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    also: Tuple[Any, ...] = ()

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        text = f"{kind} {' and '.join(bounds)}".strip()
        extras = [repr(a) if isinstance(a, str) else str(a) for a in self.also] + (["null"] if self.optional else [])
        return text + (f" (or {' or '.join(extras)})" if extras else "")

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if any(value == a and type(value) is type(a) for a in self.also):
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True


def count(key: str, low: int = 1, **kw) -> Rule:
    return Rule(key, integer=True, low=low, **kw)


def fraction(key: str, **kw) -> Rule:
    """A probability-like number in [0, 1] (narrow with ``low_open``/``high_open``)."""
    return Rule(key, low=0.0, high=1.0, **kw)


def positive(key: str, **kw) -> Rule:
    return Rule(key, low=0.0, low_open=True, **kw)


RULES: Sequence[Rule] = (
    count("seed", low=0),
    count("trainer.epochs"),
    count("trainer.max_steps", also=(-1,)),
    count("trainer.stop_at_step", optional=True),
    count("trainer.accum_steps"),
    count("trainer.log_every"),
    count("trainer.ckpt_every_steps", low=0),
    count("trainer.ckpt_every_epochs"),
    count("trainer.keep_last"),
    count("trainer.keep_every_epochs", low=0),
    positive("trainer.clip_grad", optional=True),
    positive("optim.blr"),
    positive("optim.lr", optional=True),
    count("optim.base_batch"),
    Rule("optim.weight_decay", low=0.0),
    positive("optim.eps"),
    fraction("optim.layer_decay", low_open=True),
    Rule("sched.warmup_epochs", low=0.0),
    count("sched.warmup_steps", low=0, optional=True),
    fraction("sched.min_lr_ratio"),
    positive("sched.gamma"),
    count("data.batch_size"),
    count("data.eval_batch_size", optional=True),
    count("data.num_workers", low=0),
    count("data.num_samples"),
    count("data.synthetic_size", optional=True),
    fraction("data.hflip"),
    fraction("data.flip_prob"),
    fraction("data.crop_pct", low_open=True),
    count("data.max_images", low=0),
    count("data.max_val_images", low=0),
    count("data.max_size"),
    count("data.num_classes", optional=True, also=("auto",)),
    count("data.synthetic.num_train"),
    count("data.synthetic.num_val"),
    fraction("model.mask_ratio", low_open=True, high_open=True),
    fraction("model.drop_path_rate", high_open=True),
    count("model.decoder_dim"),
    count("model.decoder_depth", low=0),
    count("model.decoder_heads"),
    count("vis.every_epochs", low=0),
    count("vis.num_images"),
    count("eval_every", low=0),
    fraction("ema.decay"),
    Rule("aug.mixup", low=0.0),
    Rule("aug.cutmix", low=0.0),
    fraction("aug.mixup_prob"),
    fraction("aug.mixup_switch_prob"),
    fraction("aug.smoothing", high_open=True),
    fraction("aug.reprob"),
    fraction("aug.hflip"),
    count("aug.recount", low=0),
    count("detector.fpn_channels"),
    count("knn.k"),
    positive("knn.temperature"),
    count("probe.epochs"),
    count("probe.batch_size", low=2),  # the probe's BatchNorm needs more than one sample per batch
    positive("probe.blr"),
    positive("probe.lr", optional=True),
    count("probe.base_batch"),
    Rule("probe.momentum", low=0.0, high=1.0, high_open=True),
    Rule("probe.weight_decay", low=0.0),
    count("probe.warmup_epochs", low=0),
    count("probe.log_every"),
)

#: the torchvision ``MaskRCNN`` arguments ``detector.maskrcnn`` may set (numbers), with their ranges;
#: any other key there is refused (torchvision would swallow a misspelt one silently)
MASKRCNN_RULES: Sequence[Rule] = tuple(
    count(f"detector.maskrcnn.{name}") for name in (
        "rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train", "rpn_post_nms_top_n_test",
        "rpn_batch_size_per_image", "box_batch_size_per_image", "box_detections_per_img",
    )
) + tuple(
    fraction(f"detector.maskrcnn.{name}") for name in (
        "rpn_nms_thresh", "rpn_fg_iou_thresh", "rpn_bg_iou_thresh", "rpn_score_thresh",
        "box_score_thresh", "box_nms_thresh", "box_fg_iou_thresh", "box_bg_iou_thresh",
    )
) + tuple(fraction(f"detector.maskrcnn.{name}", low_open=True) for name in ("rpn_positive_fraction", "box_positive_fraction"))

#: keys holding a list of numbers: ``(key, element rule, length or None)``
LIST_RULES: Sequence[Tuple[Rule, Optional[int]]] = (
    (Rule("optim.betas", low=0.0, high=1.0, high_open=True), 2),
    (fraction("data.crop_scale", low_open=True), 2),
    (fraction("aug.scale", low_open=True), 2),
    (count("data.min_size"), None),
    (Rule("sched.milestones_epochs", low=0.0, optional=True), None),
    (count("sched.milestones_steps", low=0, optional=True), None),
    (count("data.synthetic.size"), 2),
)


#: keys with a fixed set of values (the engine's own tuples: stated once, checked here only)
CHOICES: Dict[str, Tuple[Any, ...]] = {
    "trainer.precision": PRECISIONS,
    "trainer.compile": (True, False),
    "trainer.compile_mode": COMPILE_MODES,
    "trainer.nonfinite": NONFINITE_POLICIES,
}


def _value(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=_MISSING)
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _fail(rule: Rule, value: Any, what: str = "") -> None:
    raise ConfigError(f"{rule.key}={value!r} is invalid: set it to {what or rule.describe()}")


def _check_rules(cfg: DictConfig, rules) -> None:
    """Each rule's key, where ``cfg`` has it, must satisfy the rule."""
    for rule in rules:
        value = _value(cfg, rule.key)
        if value is not _MISSING and not rule.ok(value):
            _fail(rule, value)


def check_choices(cfg: DictConfig) -> None:
    """Each key of :data:`CHOICES` that ``cfg`` has holds one of its values (``true`` is not ``1``)."""
    for key, allowed in CHOICES.items():
        value = _value(cfg, key)
        if value is not _MISSING and not any(value == a and type(value) is type(a) for a in allowed):
            shown = ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in allowed)
            raise ConfigError(f"{key} must be one of {shown}, got '{value}'")


def check_numbers(cfg: DictConfig) -> None:
    """Apply :data:`RULES` and :data:`LIST_RULES` to the keys ``cfg`` has."""
    _check_rules(cfg, RULES)
    for rule, length in LIST_RULES:
        value = _value(cfg, rule.key)
        if value is _MISSING or (value is None and rule.optional):
            continue
        shape = f"a list of {length} values" if length else "a list of values"
        what = f"{shape}, each {rule.describe()}"
        if isinstance(value, (int, float)) and not isinstance(value, bool) and length is None:
            value = [value]  # a single number where a list is allowed
        if not isinstance(value, list) or (length and len(value) != length) or not value:
            _fail(rule, value, what)
        if not all(rule.ok(v) for v in value):
            _fail(rule, value, what)
    scale = _value(cfg, "data.crop_scale")
    if isinstance(scale, list) and len(scale) == 2 and scale[0] > scale[1]:
        raise ConfigError(f"data.crop_scale={scale} is invalid: set it to [min, max] with min <= max")
    check_img_size(cfg)
    check_grad_checkpointing(cfg)
    check_choices(cfg)
    check_model(cfg)


def check_grad_checkpointing(cfg: DictConfig) -> None:
    """``trainer.grad_checkpointing``: ``true``/``false`` or a list of stage indices (integers >= 0)."""
    value = _value(cfg, "trainer.grad_checkpointing")
    if value is _MISSING or isinstance(value, bool):
        return
    if not (isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ConfigError(f"trainer.grad_checkpointing={value!r} is invalid: set it to true (all stages), false, or a list of stage indices, e.g. [0,1]")


def check_model(cfg: DictConfig) -> None:
    """The architecture of ``model.name`` with ``model.encoder_args`` (sizes >= 1, one value per stage,
    heads dividing widths) and the decoder's ``decoder_heads`` dividing ``decoder_dim``."""
    from ..models import check_architecture

    name = _value(cfg, "model.name")
    if isinstance(name, str) and name != "???":
        try:
            args = _value(cfg, "model.encoder_args")
            check_architecture(name, None if args is _MISSING else args)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    dim, heads = _value(cfg, "model.decoder_dim"), _value(cfg, "model.decoder_heads")
    if isinstance(dim, int) and isinstance(heads, int) and heads > 0 and dim % heads:
        divisors = [h for h in (1, 2, 4, 8, 16, 32) if dim % h == 0]
        raise ConfigError(f"model.decoder_heads={heads} does not divide model.decoder_dim={dim}: use one of {', '.join(map(str, divisors))} (or change decoder_dim)")


def check_img_size(cfg: DictConfig) -> None:
    """``data.img_size``: a positive integer or ``[height, width]`` of positive integers."""
    value = _value(cfg, "data.img_size")
    if value is _MISSING:
        return
    items = value if isinstance(value, list) else [value]
    if len(items) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
        raise ConfigError(f"data.img_size={value!r} is invalid: set it to a positive integer or [height, width]")


def check_pretrain(cfg: DictConfig) -> None:
    """The mask ratio must leave at least one masked and one visible unit of the image's unit grid."""
    from ..tasks.pretrain.task import check_mask_ratio, expected_unit

    model = cfg.get("model") or {}
    if model.get("name") in (None, "???") or "mask_ratio" not in model:
        return
    try:
        unit = expected_unit(model.name, _value(cfg, "model.encoder_args") or {})
    except ValueError:  # an unknown model name: reported when the model is built, with a did-you-mean
        return
    check_mask_ratio(float(model.mask_ratio), _value(cfg, "data.img_size"), unit)


def check_decode_mode(cfg: DictConfig) -> None:
    """``data.decode``: cpu or device."""
    from ..data import check_decode

    value = _value(cfg, "data.decode")
    if value is not _MISSING:
        check_decode(value)


def check_detect(cfg: DictConfig) -> None:
    """``detector.maskrcnn``: only the keys of :data:`MASKRCNN_RULES` (a did-you-mean for a typo), each in range."""
    given = _value(cfg, "detector.maskrcnn")
    if given is _MISSING or given is None:
        return
    if not isinstance(given, dict):
        raise ConfigError(f"detector.maskrcnn={given!r} is invalid: set it to a mapping of MaskRCNN arguments, e.g. {{box_detections_per_img: 100}}")
    valid = sorted(rule.key.rsplit(".", 1)[1] for rule in MASKRCNN_RULES)
    for key in given:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean detector.maskrcnn.{close[0]}? " if close else ""
            raise ConfigError(f"unknown key detector.maskrcnn.{key}: {hint}valid keys: {', '.join(valid)}")
    _check_rules(cfg, MASKRCNN_RULES)


TASK_CHECKS: dict = {"pretrain": (check_pretrain, check_decode_mode), "detect": (check_detect,)}


def check_config(cfg: DictConfig, task: str) -> None:
    """Every check for a ``task`` config; raises :class:`ConfigError` at the first violation."""
    check_numbers(cfg)
    for check in TASK_CHECKS.get(task, ()):
        check(cfg)
