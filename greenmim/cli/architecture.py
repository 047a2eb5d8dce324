"""``pretrained=``, ``resume=`` and an ``eval_only`` checkpoint carry the architecture: the ``model``
config is taken from the checkpoint.

:func:`adopt_checkpoint_architecture` runs in :func:`~greenmim.cli.common.run_app`, before the config is
checked, and changes the resolved config in place:

* **resume** (``resume=auto`` with a checkpoint in ``output_dir``, or ``resume=PATH``) of a checkpoint
  of the same task: its stored ``model`` node and ``data.img_size`` replace the config's. A key the
  command line sets (``model=``, ``model.method=``, ``model.encoder_args.depths=``, ...) is kept; when it
  differs from the checkpoint on what makes the model (:data:`RESUME_KEYS`), the run is refused with a
  :class:`~greenmim.engine.errors.UserError` naming each key, the checkpoint's value and this run's.
* **eval_only=true** (fine-tuning, detection): the checkpoint it evaluates
  (:func:`~greenmim.cli.common.eval_checkpoint`), when written by the same task, is carried as a resume is.
* **pretrained=PATH** (fine-tuning, k-NN, linear probe, detection; no resume): ``model.name`` and the
  architecture keys of ``model.encoder_args`` come from the checkpoint
  (:func:`~greenmim.weights.architecture.read_architecture`: a greenmim checkpoint's stored config, an
  export's description, or the weights themselves, e.g. an official GreenMIM checkpoint), unless the
  command line sets them; ``model.drop_path_rate`` and ``data.img_size`` stay the recipe's. A command-line
  choice whose tensor shapes do not fit the checkpoint is refused with the keys that differ; a
  window size may differ (timm resizes the relative-position tables).

Only command-line overrides count as a choice (Hydra's ``overrides.task``): an experiment's default
``model`` is replaced by the checkpoint's. The carried keys end up in the run's ``config.yaml``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ..engine.checkpoint import is_no_resume, list_checkpoints
from ..engine.config import stored_config
from ..engine.errors import ConfigError, UserError
from ..weights.architecture import Architecture, NOT_ARCHITECTURE, read_architecture, shape_differences

log = logging.getLogger("greenmim")

#: ``model`` keys that make the model a resume continues (a command-line value that differs is refused)
RESUME_KEYS = ("name", "method", "decoder_dim", "decoder_depth", "decoder_heads")


def command_line_keys() -> Set[str]:
    """The dotted keys the command line sets (``model`` for ``model=X``), from Hydra's overrides; empty
    outside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return set()
        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # pragma: no cover - Hydra internals
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}


def _explicit(key: str, explicit: Set[str]) -> bool:
    """Whether the command line sets ``key`` or a node above it."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in explicit for i in range(1, len(parts) + 1))


def _peek(path: Path) -> Optional[Dict[str, Any]]:
    """A checkpoint's contents with its tensors memory-mapped (cheap), or None when it cannot be read
    (the trainer or the loader then says why)."""
    try:
        contents = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:
        return None
    return contents if isinstance(contents, dict) else None


def _resume_source(cfg: DictConfig) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The checkpoint a resume will continue (resolved as the trainer does), with its contents; None for a fresh run."""
    resume = cfg.resume
    if is_no_resume(resume):
        return None
    given = Path(str(cfg.output_dir) if str(resume) == "auto" else str(resume)).expanduser()
    candidates = list_checkpoints(given) if str(resume) == "auto" or given.is_dir() else [given]
    for path in candidates:
        contents = _peek(path) if path.is_file() else None
        if contents is not None:
            return path, contents
    return None


def adopt_checkpoint_architecture(cfg: DictConfig, task: str) -> None:
    """Carry the architecture of the run's ``resume=`` or ``pretrained=`` checkpoint into ``cfg`` (see the module notes)."""
    explicit = command_line_keys()
    if task != "pretrain" and cfg.eval_only:  # eval_only, protocol and pretrained are keys of finetune/detect only
        evaluated = _eval_source(cfg, task)
        if evaluated is not None and stored_config(evaluated[1]).get("task") == task:
            _adopt_resumed(cfg, *evaluated, explicit, option="checkpoint")
        return
    resumed = _resume_source(cfg) if task != "finetune" or cfg.protocol == "finetune" else None
    if resumed is not None:
        path, contents = resumed
        if stored_config(contents).get("task") == task:
            _adopt_resumed(cfg, path, contents, explicit)
        return
    pretrained = None if task == "pretrain" else cfg.pretrained
    if pretrained:
        arch = read_architecture(str(pretrained), _peek(Path(str(pretrained))) if not str(pretrained).endswith(".safetensors") else None)
        if arch is not None:
            _adopt_pretrained(cfg, str(pretrained), arch, explicit)


def _eval_source(cfg: DictConfig, task: str) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The checkpoint ``eval_only`` will evaluate, with its contents; None when there is none to read
    (the evaluation then says why)."""
    from ..tasks.finetune.task import BEST_NAME
    from .common import eval_checkpoint

    try:
        path = Path(eval_checkpoint(cfg, Path(str(cfg.output_dir)).expanduser(), prefer=BEST_NAME if task == "finetune" else None))
    except ConfigError:
        return None
    contents = _peek(path) if path.is_file() else None
    return None if contents is None else (path, contents)


def _adopt_resumed(cfg: DictConfig, path: Path, contents: Dict[str, Any], explicit: Set[str], option: str = "resume") -> None:
    """Carry a same-task checkpoint's ``model`` and ``data.img_size`` (``option``: ``resume`` or the
    ``checkpoint`` an ``eval_only`` run evaluates); a differing command-line model key is refused."""
    if not isinstance(stored_config(contents).get("model"), dict):
        return
    theirs = stored_config(contents, "model")
    values = {f"model.{k}": v for k, v in theirs.items() if k != "encoder_args"}
    if theirs.get("encoder_args"):  # an old record may have none
        values.update({f"model.encoder_args.{k}": v for k, v in theirs["encoder_args"].items()})
    img = stored_config(contents, "data").get("img_size")
    if img is not None:
        values["data.img_size"] = img
    differ = []
    for key, value in values.items():
        leaf = key.split(".", 1)[1]
        makes_model = leaf in RESUME_KEYS or (leaf.startswith("encoder_args.") and leaf.split(".", 1)[1] not in NOT_ARCHITECTURE)
        if makes_model and _explicit(key, explicit) and _plain(OmegaConf.select(cfg, key, default=None)) != value:
            differ.append(f"{key}: checkpoint {value}, this command {_plain(OmegaConf.select(cfg, key, default=None))}")
    if differ and option == "checkpoint":
        raise UserError(
            f"checkpoint={path} holds a model of another architecture ({'; '.join(differ)}): drop these overrides "
            "(eval_only takes the model from its checkpoint)"
        )
    if differ:
        raise UserError(
            f"resume={path} continues a run with another model ({'; '.join(differ)}): drop these overrides (a resume "
            "takes the model from its checkpoint), or start a fresh output_dir= (e.g. with pretrained=)"
        )
    _carry(cfg, values, explicit)


def _adopt_pretrained(cfg: DictConfig, path: str, arch: Architecture, explicit: Set[str]) -> None:
    current = cfg.model.encoder_args
    values: Dict[str, Any] = {"model.name": arch.name}
    keys = [k for k in current if k not in NOT_ARCHITECTURE] + [k for k in arch.encoder_args if k not in current]
    values.update({f"model.encoder_args.{k}": arch.encoder_args.get(k) for k in keys})
    _carry(cfg, values, explicit)
    differ = shape_differences(arch, str(cfg.model.name), _plain(cfg.model.encoder_args))
    if differ:
        raise UserError(
            f"pretrained={path} holds a {arch.describe()} (from its {arch.source}), and this command's model settings "
            f"do not fit its weights ({'; '.join(differ)}): drop model= and model.encoder_args.* to use the checkpoint's "
            "architecture (model= is only needed to choose another one that its weights fit, e.g. another window_size)"
        )


def _carry(cfg: DictConfig, values: Dict[str, Any], explicit: Set[str]) -> List[str]:
    """Set each dotted key of ``values`` in ``cfg`` unless the command line sets it; returns the changed keys."""
    changed = []
    with open_dict(cfg):
        for key, value in values.items():
            if _explicit(key, explicit) or _plain(OmegaConf.select(cfg, key, default=None)) == value:
                continue
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
            changed.append(key)
    return changed


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
