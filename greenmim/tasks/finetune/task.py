"""The fine-tuning task for the shared :class:`greenmim.engine.Trainer`.

The trainer owns the loop (DDP, precision, accumulation, clipping, warmup + cosine per step,
checkpoints, ``resume``, progress, TensorBoard / ``metrics.jsonl``); this task supplies:

* the classifier (:func:`~greenmim.tasks.finetune.model.create_classifier`, optionally from pretrained weights);
* the training loader (RandAugment + random erasing, per-sample seeded so resume is exact);
* the loss of a batch (timm Mixup/CutMix with label smoothing + SoftTargetCrossEntropy);
* layer-decay parameter groups (:mod:`~greenmim.weights.layer_decay`);
* evaluation (top-1, top-5 with more than 5 classes, loss) after every epoch, optional model EMA (timm ``ModelEmaV3``) and a
  ``checkpoints/best.pt`` holding the weights with the best validation top-1.

``best.pt`` (and :func:`save_classifier`) use the layout ``{"format": "greenmim-classifier", "model":
state_dict, "model_ema": ..., "metrics": ..., "classes": [...], "config": ...}``; it loads with
:func:`~greenmim.weights.loading.load_pretrained`, ``timm``'s ``load_checkpoint`` and
``greenmim-finetune eval_only=true``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from ...data.datasets import build_train_loader
from ...data.images import check_images
from ...engine import TrainTask, atomic_save
from ...engine.checkpoint import CHECKPOINT_DIR
from ...engine.distributed import DistInfo
from ...engine.errors import ConfigError
from ...engine.signals import ignore_stop_signals
from ...models.registry import timm_takes_img_size
from ...weights import LoadReport, param_groups_layer_decay, transfer_kwargs
from .data import ClassificationData, build_classification_data, build_mixup, build_train_criterion
from .evaluate import build_eval_loader, evaluate
from .model import create_classifier

log = logging.getLogger("greenmim")

CLASSIFIER_FORMAT = "greenmim-classifier"
BEST_NAME = "best.pt"


def model_kwargs(cfg: DictConfig) -> Dict[str, Any]:
    """timm constructor arguments of the classifier (:func:`~greenmim.weights.transfer_kwargs`) plus
    ``img_size`` from ``data.img_size`` where timm's model takes one (PVTv2's does not). ``drop_path_rate``
    comes from ``model.drop_path_rate``."""
    args = transfer_kwargs(cfg.model.name, to_container(cfg.model.encoder_args), "fine-tuning")
    if timm_takes_img_size(cfg.model.name):
        args.setdefault("img_size", int(cfg.data.img_size))
    return args


def to_container(node: Any) -> Dict[str, Any]:
    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def save_classifier(path: Path, model: nn.Module, ema: Optional[nn.Module], metrics: Dict[str, float], classes: List[str], config: Dict[str, Any]) -> Path:
    """Atomically write a classifier checkpoint (see the module docstring)."""
    state = {
        "format": CLASSIFIER_FORMAT,
        "model": model.state_dict(),
        "metrics": dict(metrics),
        "classes": list(classes),
        "config": config,
    }
    if ema is not None:
        state["model_ema"] = ema.module.state_dict()
    return atomic_save(state, path)


VAL_CORRUPT_HINT = "remove or replace the file(s) (validation images are never skipped, so that accuracies are exact)"


def check_validation_images(data: ClassificationData) -> None:
    """Fail before training when a validation image does not decode (not after the first epoch), with
    a fix that applies to validation (``data.on_corrupt`` covers training images only)."""
    data.val.corrupt_hint = VAL_CORRUPT_HINT
    check_images(data.val.paths, "validation image(s)", VAL_CORRUPT_HINT)


class FinetuneTask(TrainTask):
    """Image classification fine-tuning from a resolved ``finetune.yaml`` config."""

    def __init__(self, cfg: DictConfig, data: Optional[ClassificationData] = None):
        self.cfg = cfg
        self.data = data if data is not None else build_classification_data(cfg.data, cfg.aug)
        check_validation_images(self.data)
        self.num_classes = self.data.num_classes
        aug = cfg.aug
        self.mixup = build_mixup(aug, self.num_classes)
        if self.mixup is not None and int(cfg.data.batch_size) % 2:
            raise ConfigError(f"Mixup/CutMix needs an even data.batch_size, got {cfg.data.batch_size}: change it or set aug.mixup=0 aug.cutmix=0")
        self.criterion = build_train_criterion(self.mixup, float(aug.smoothing))
        self.ema: Optional[nn.Module] = None
        self.best: Dict[str, float] = {"acc1": -1.0, "epoch": 0}
        self.last_metrics: Dict[str, float] = {}
        self.load_report: Optional[LoadReport] = None
        self._val_loader = None

    # -- model and data -------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        m = self.cfg.model
        model, self.load_report = create_classifier(
            m.name,
            self.num_classes,
            drop_path_rate=float(m.drop_path_rate),
            pretrained=self.cfg.pretrained,
            use_ema=bool(self.cfg.pretrained_use_ema),
            **model_kwargs(self.cfg),
        )
        if self.load_report is not None:
            log.info("pretrained: %s", self.load_report.summary())
        else:
            log.info("no pretrained weights (pretrained=null): training %s from random initialisation", m.name)
        ema_cfg = self.cfg.ema
        if ema_cfg.enabled:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=float(ema_cfg.decay), use_warmup=bool(ema_cfg.warmup))
        self._model = model
        return model

    def build_train_loader(self, dist: DistInfo, seed: int) -> torch.utils.data.DataLoader:
        d = self.cfg.data
        return build_train_loader(self.data.train, int(d.batch_size), dist, seed=seed, num_workers=int(d.num_workers), pin_memory=bool(d.pin_memory))

    def val_loader(self, dist: DistInfo) -> torch.utils.data.DataLoader:
        if self._val_loader is None:
            d = self.cfg.data
            self._val_loader = build_eval_loader(
                self.data.val,
                int(d.eval_batch_size or d.batch_size),
                int(d.num_workers),
                dist.rank,
                dist.world_size,
                pin_memory=dist.device.type == "cuda",
                worker_init_fn=ignore_stop_signals,  # a stop signal is the training process' to handle
            )
        return self._val_loader

    def param_groups(self, model: nn.Module, weight_decay: float) -> Optional[List[Dict[str, Any]]]:
        return param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=float(self.cfg.optim.layer_decay))

    # -- training -------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, batch: Any, trainer) -> Tuple[torch.Tensor, Dict[str, float]]:
        images, targets = batch
        images = images.to(trainer.device, non_blocking=True)
        targets = targets.to(trainer.device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return self.criterion(model(images), targets), {}

    def on_step_end(self, model: nn.Module, trainer) -> None:
        """Update the EMA after every optimizer step (timm's order: step, then EMA)."""
        if self.ema is not None:
            self.ema.to(trainer.device)  # built on the CPU with the model; a no-op once moved
            self.ema.update(model, step=trainer.step)

    # -- evaluation and best checkpoint -----------------------------------------------------------
    def evaluate(self, model: nn.Module, trainer) -> Dict[str, float]:
        """Validation metrics every ``eval_every`` epochs and after the last one (``{}`` otherwise)."""
        every = int(self.cfg.eval_every)
        if not (trainer.is_last_epoch or (every > 0 and (trainer.epoch + 1) % every == 0)):
            return {}
        loader = self.val_loader(trainer.dist)
        metrics = evaluate(model, loader, trainer.device, trainer.precision.autocast)
        scores = {k: v for k, v in metrics.items() if k != "count"}  # loss, acc1[, acc5]
        out = {f"val_{k}": v for k, v in scores.items()}
        if self.ema is not None:
            self.ema.to(trainer.device)
            ema = evaluate(self.ema.module, loader, trainer.device, trainer.precision.autocast)
            out.update({f"ema_val_{k}": v for k, v in ema.items() if k != "count"})
        if out["val_acc1"] > self.best["acc1"]:
            self.best = {**scores, "epoch": trainer.epoch + 1}
        out["best_acc1"] = self.best["acc1"]
        self.last_metrics = out
        return out

    def on_epoch_end(self, model: nn.Module, trainer) -> None:
        """Write ``checkpoints/best.pt`` when this epoch's validation top-1 is the best so far."""
        if self.best.get("epoch") == trainer.epoch + 1 and trainer.dist.is_main:
            path = Path(trainer.output_dir) / CHECKPOINT_DIR / BEST_NAME
            save_classifier(path, model, self.ema, {**self.last_metrics, "epoch": trainer.epoch + 1, "step": trainer.step},
                            self.data.classes, OmegaConf.to_container(self.cfg, resolve=True))
            log.info("new best val top-1 %.2f%% (epoch %d): saved %s", self.best["acc1"], trainer.epoch + 1, path)

    # -- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"best": dict(self.best)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best = dict(state.get("best", self.best))

    def shared_state_dict(self) -> Dict[str, Any]:
        return {"ema": self.ema.module.state_dict()} if self.ema is not None else {}

    def load_shared_state_dict(self, state: Dict[str, Any]) -> None:
        if self.ema is None:
            return
        if "ema" in state:
            self.ema.module.load_state_dict(state["ema"])
        else:  # EMA switched on for a run that had none: start it from the resumed weights
            log.warning("ema.enabled=true but the checkpoint holds no EMA weights: the EMA starts from the resumed weights")
            self.ema.set(self._model)
