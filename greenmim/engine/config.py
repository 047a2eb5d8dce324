"""The config schema: the one table of ranges and choices of every config key, and the typed
``trainer``/``optim`` settings of a :class:`~greenmim.engine.Trainer` built from a composed config.

Where each thing is stated, once:

* **Defaults**: the Hydra YAML (``configs/``: the root config of each task, its groups and
  experiments). Nothing here, nor in the code that reads a config, restates one: code reads
  ``cfg.key`` / ``cfg["key"]``, and a caller without the CLI composes the YAML (:func:`compose`,
  :meth:`TrainerConfig.from_yaml`) instead of writing a config by hand.
* **Ranges and choices**: :data:`RULES` (numbers), :data:`LIST_RULES` (lists of numbers),
  :data:`CHOICES` (strings from a fixed set) and :data:`MASKRCNN_RULES` below, applied by
  :func:`check_values` once, before anything is built or written (``greenmim.cli.validate``
  adds the checks that need a model room: architecture, the mask ratio against the unit grid).

A violation raises :class:`~greenmim.engine.errors.ConfigError` with one line: the key, the value
given and what it must be. A key absent from the config is not checked.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import ConfigError
from .precision import PRECISIONS
from .schedule import SCHEDULES
from .step import COMPILE_MODES

if TYPE_CHECKING:  # annotations only: omegaconf is imported where it is used
    from omegaconf import DictConfig

NONFINITE_POLICIES = ("stop", "skip")
DEVICES = ("auto", "cpu", "cuda")
#: what to do with a bad input (an unreadable image, a bad box, a listed image that is absent)
SKIP_OR_ERROR = ("skip", "error")
#: what greenmim-finetune does with the encoder (the last two: frozen-feature evaluations)
PROTOCOLS = ("finetune", "knn", "linear_probe")
_MISSING = object()
#: top-level keys of a composed config copied into :class:`TrainerConfig`
_TOP_LEVEL = ("output_dir", "resume", "seed", "config", "task")


# ---------------------------------------------------------------------------------------------- rules
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
    count("data.synthetic_seed", low=0),
    fraction("data.hflip"),
    fraction("data.flip_prob"),
    fraction("data.crop_pct", low_open=True),
    count("data.max_images", low=0),
    count("data.max_val_images", low=0),
    count("data.max_size"),
    count("data.num_classes", optional=True, also=("auto",)),
    count("data.synthetic.num_train"),
    count("data.synthetic.num_val"),
    count("data.synthetic.seed", low=0),
    count("data.year", low=0),
    Rule("aug.color_jitter", low=0.0, optional=True),
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

#: keys holding one string of a fixed set: ``key -> allowed values`` (a value outside is refused
#: naming them); ``data.decode`` keeps its own message (:func:`greenmim.data.check_decode`)
CHOICES: Dict[str, Tuple[str, ...]] = {
    "trainer.precision": PRECISIONS,
    "trainer.device": DEVICES + ("mps",),
    "trainer.nonfinite": NONFINITE_POLICIES,
    "trainer.compile_mode": COMPILE_MODES,
    "sched.name": tuple(SCHEDULES),
    "data.on_corrupt": SKIP_OR_ERROR,
    "data.bad_boxes": SKIP_OR_ERROR,
    "data.missing_images": SKIP_OR_ERROR,
    "protocol": PROTOCOLS,
}

#: keys holding ``true`` or ``false`` (``optional``: null too, meaning "the code decides")
FLAGS: Sequence[str] = (
    "trainer.compile", "trainer.tensorboard", "trainer.find_unused_parameters", "model.norm_pix_loss", "model.shared_mask",
    "data.filter_empty", "data.pin_memory", "ema.enabled", "ema.warmup", "eval_only", "eval_ema", "pretrained_use_ema",
)
OPTIONAL_FLAGS: Sequence[str] = ("data.device_prefetch", "detector.out_norm")

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


def value_of(cfg: "DictConfig", key: str) -> Any:
    """The plain value of a dotted ``key`` of ``cfg`` (containers resolved), or :data:`MISSING`."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    value = OmegaConf.select(cfg, key, default=_MISSING)
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


MISSING = _MISSING


def _fail(rule: Rule, value: Any, what: str = "") -> None:
    raise ConfigError(f"{rule.key}={value!r} is invalid: set it to {what or rule.describe()}")


def check_rules(cfg: "DictConfig", rules: Sequence[Rule]) -> None:
    """Each rule's key, where ``cfg`` has it, must satisfy the rule."""
    for rule in rules:
        value = value_of(cfg, rule.key)
        if value is not _MISSING and not rule.ok(value):
            _fail(rule, value)


def check_choices(cfg: "DictConfig") -> None:
    """Each :data:`CHOICES` key, where ``cfg`` has it, holds one of its values."""
    for key, allowed in CHOICES.items():
        value = value_of(cfg, key)
        if value is not _MISSING and value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}: set e.g. {key}={allowed[0]}")


def check_flags(cfg: "DictConfig") -> None:
    """Each :data:`FLAGS` key (and :data:`OPTIONAL_FLAGS` key, null allowed), where ``cfg`` has it, is a bool."""
    for key in (*FLAGS, *OPTIONAL_FLAGS):
        value = value_of(cfg, key)
        if value is _MISSING or isinstance(value, bool) or (value is None and key in OPTIONAL_FLAGS):
            continue
        null = " (or null: the default)" if key in OPTIONAL_FLAGS else ""
        raise ConfigError(f"{key} must be true or false{null}, got {value!r}: set {key}=true or {key}=false")


def check_values(cfg: "DictConfig") -> None:
    """Apply :data:`RULES`, :data:`LIST_RULES`, :data:`CHOICES` and :data:`FLAGS` (and the shapes of
    ``data.crop_scale``, ``data.img_size`` and ``trainer.grad_checkpointing``) to the keys ``cfg`` has."""
    check_rules(cfg, RULES)
    for rule, length in LIST_RULES:
        value = value_of(cfg, rule.key)
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
    scale = value_of(cfg, "data.crop_scale")
    if isinstance(scale, list) and len(scale) == 2 and scale[0] > scale[1]:
        raise ConfigError(f"data.crop_scale={scale} is invalid: set it to [min, max] with min <= max")
    check_choices(cfg)
    check_flags(cfg)
    check_img_size(cfg)
    check_grad_checkpointing(cfg)


def check_grad_checkpointing(cfg: "DictConfig") -> None:
    """``trainer.grad_checkpointing``: ``true``/``false`` or a list of stage indices (integers >= 0)."""
    value = value_of(cfg, "trainer.grad_checkpointing")
    if value is _MISSING or isinstance(value, bool):
        return
    if not (isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ConfigError(f"trainer.grad_checkpointing={value!r} is invalid: set it to true (all stages), false, or a list of stage indices, e.g. [0,1]")


def check_img_size(cfg: "DictConfig") -> None:
    """``data.img_size``: a positive integer or ``[height, width]`` of positive integers."""
    value = value_of(cfg, "data.img_size")
    if value is _MISSING:
        return
    items = value if isinstance(value, list) else [value]
    if len(items) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
        raise ConfigError(f"data.img_size={value!r} is invalid: set it to a positive integer or [height, width]")


def check_maskrcnn(cfg: "DictConfig") -> None:
    """``detector.maskrcnn``: only the keys of :data:`MASKRCNN_RULES` (a did-you-mean for a typo), each in range."""
    given = value_of(cfg, "detector.maskrcnn")
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
    check_rules(cfg, MASKRCNN_RULES)


# ---------------------------------------------------------------------------------------------- typed settings
@dataclass
class TrainerConfig:
    """How to train. Every field is a ``trainer.*`` config key (``output_dir``, ``resume`` and
    ``seed`` are top-level keys in the Hydra configs) and has no default here: the YAML states them
    (``configs/trainer/default.yaml`` and each root config's ``trainer:`` recipe). Build one with
    :func:`trainer_config` from a composed config, or :meth:`from_yaml` with the fields to change.

    Attributes:
        output_dir: the run's folder (checkpoints, ``train.log``, ``metrics.jsonl``, ``tb/``, images).
        epochs: epochs to train (the schedule's length unless ``max_steps`` is smaller).
        max_steps: cap on optimizer steps; > 0 also shortens the schedule to it. -1: no cap.
        stop_at_step: stop (after checkpointing) at this step without changing the schedule, e.g.
            to split a long schedule into time-boxed jobs continued with ``resume=auto``.
        accum_steps: micro-batches per optimizer step (gradient accumulation).
        precision: ``bf16`` | ``fp16`` (with loss scaling) | ``fp32``.
        device: ``auto`` | ``cpu`` | ``cuda``.
        clip_grad: max total gradient norm, or None for no clipping.
        grad_checkpointing: activation checkpointing: False, True (all stages) or a list of stage
            indices; applied to ``model.encoder`` if the model has one, else to the model.
        nonfinite: on a NaN/Inf loss, ``stop`` (raise, keeping the last good checkpoint) or ``skip``
            the step (no update; warned and counted).
        log_every: steps between progress lines and TensorBoard scalars.
        ckpt_every_steps: also checkpoint every this many steps (0: only at epoch ends).
        ckpt_every_epochs: checkpoint at the end of every this many epochs (and always at the end).
        keep_last: rolling checkpoints to keep.
        keep_every_epochs: keep a permanent copy every this many epochs (0: none).
        tensorboard: write TensorBoard event files.
        seed: base seed; rank ``r`` uses ``seed + r`` for its own streams.
        resume: None (fresh run), ``auto`` (latest valid checkpoint in ``output_dir``, if any) or a path.
        find_unused_parameters: passed to DDP.
        compile: compile the model's forward and backward once with ``torch.compile``
            (:mod:`greenmim.engine.step`); best with static plans.
        compile_mode: ``auto`` (CUDA graphs on one CUDA process without accumulation, else
            ``default``) or a ``torch.compile`` mode.
        config: the resolved full config, stored in checkpoints and written to ``config.yaml``.
    """

    output_dir: str
    epochs: int
    max_steps: int
    stop_at_step: Optional[int]
    accum_steps: int
    precision: str
    device: str
    clip_grad: Optional[float]
    grad_checkpointing: Union[bool, List[int]]
    nonfinite: str
    log_every: int
    ckpt_every_steps: int
    ckpt_every_epochs: int
    keep_last: int
    keep_every_epochs: int
    tensorboard: bool
    seed: int
    resume: Optional[str]
    find_unused_parameters: bool
    compile: bool
    compile_mode: str
    config: Dict[str, Any]

    @classmethod
    def from_yaml(cls, task: str = "pretrain", **fields: Any) -> "TrainerConfig":
        """The ``task`` root config's trainer settings (the YAML's defaults; ``config`` empty), with
        ``fields`` replaced: ``TrainerConfig.from_yaml(output_dir="runs/x", epochs=10)``."""
        return dataclasses.replace(trainer_config(compose(task)), **{"config": {}, **fields})


@dataclass
class OptimConfig:
    """AdamW settings (``optim.*``): ``lr`` (absolute, wins when set) or ``blr`` scaled by
    ``effective_batch / base_batch``; ``weight_decay``, ``betas``, ``eps``. No defaults here: the
    YAML (``configs/optim/*.yaml``) states them; see :func:`optim_config` and :meth:`from_yaml`."""

    name: str
    blr: float
    lr: Optional[float]
    base_batch: int
    weight_decay: float
    betas: Sequence[float]
    eps: float

    @classmethod
    def from_yaml(cls, task: str = "pretrain", **fields: Any) -> "OptimConfig":
        """The ``task`` root config's optimizer (``optim/adamw.yaml`` for pretraining), with ``fields`` replaced."""
        return dataclasses.replace(optim_config(compose(task)), **fields)

    @classmethod
    def from_group(cls, name: str = "adamw", **fields: Any) -> "OptimConfig":
        """The ``optim`` group file ``configs/optim/<name>.yaml`` read with PyYAML alone (no Hydra or
        omegaconf: the benchmark runs where only torch and timm are installed), with ``fields`` replaced.
        The file must hold plain values (no ``${...}``)."""
        import importlib.resources

        import yaml

        text = importlib.resources.files("greenmim.configs").joinpath("optim", f"{name}.yaml").read_text()
        values = {k: v for k, v in yaml.safe_load(text).items() if k != "layer_decay"}  # a task's key, not the engine's
        return cls(**{**values, **fields})


# ---------------------------------------------------------------------------------------------- building
def compose(task: str, *overrides: str) -> "DictConfig":
    """The ``task`` root config (``pretrain``, ``finetune`` or ``detect``) composed with Hydra from
    ``configs/`` exactly as its CLI composes it, with command-line style ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    outer = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()  # compose in a context of its own, e.g. inside a running Hydra app ...
    try:
        with initialize_config_module("greenmim.configs", version_base="1.3"):
            return hydra_compose(task, overrides=list(overrides))
    finally:
        if outer is not None:  # ... whose context is restored afterwards
            GlobalHydra.instance().initialize(outer)


def to_dict(node: Any) -> Dict[str, Any]:
    """A resolved plain-python copy of a config node."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def _dataclass_from(cls, values: Dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hints.append(f"{where}.{key}" + (f" (did you mean {where}.{close[0]}?)" if close else ""))
        raise ConfigError(f"unknown config key(s) {', '.join(hints)}; valid: {', '.join(sorted(names - set(_TOP_LEVEL)))}")
    missing = sorted(names - set(values))
    if missing:
        raise ConfigError(f"config key(s) {', '.join(f'{where}.{k}' for k in missing)} missing: compose the config from "
                          "configs/ (greenmim.engine.config.compose) instead of writing it by hand")
    return cls(**values)


def trainer_config(cfg: "DictConfig") -> TrainerConfig:
    """``TrainerConfig`` from ``cfg.trainer`` plus the top-level ``output_dir``, ``resume`` and ``seed``."""
    values = to_dict(cfg.trainer)
    values.update(output_dir=str(cfg.output_dir), resume=cfg.resume, seed=int(cfg.seed))
    values["config"] = to_dict(cfg)
    return _dataclass_from(TrainerConfig, values, "trainer")


def optim_config(cfg: "DictConfig") -> OptimConfig:
    """The engine's ``OptimConfig`` from ``cfg.optim``; ``optim.layer_decay`` belongs to the task
    (fine-tuning and detection build their own parameter groups with it), not to the engine."""
    optim = to_dict(cfg.optim)
    optim.pop("layer_decay", None)
    return _dataclass_from(OptimConfig, optim, "optim")


def sched_config(cfg: "DictConfig") -> Dict[str, Any]:
    """The ``sched`` node as the plain dict :func:`~greenmim.engine.schedule.build_schedule` takes."""
    return to_dict(cfg.sched)


def stored_config(ckpt: Any, section: Optional[str] = None) -> Dict[str, Any]:
    """The resolved config a checkpoint stores (``ckpt["config"]``), or its top-level ``section``
    (``"model"``, ``"data"``, ...), as a dict: ``{}`` where there is none (a checkpoint of another
    program or of an older version). The one place that reads a stored config leniently."""
    config = ckpt.get("config") if isinstance(ckpt, Mapping) else None
    if section is not None and isinstance(config, Mapping):
        config = config.get(section)
    return dict(config) if isinstance(config, Mapping) else {}
