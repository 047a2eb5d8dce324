"""The two flows of ``greenmim-detect`` over a built :class:`~.task.DetectionTask`; each returns the
final COCO metrics on every rank and writes them (rank 0) into the run's ``output_dir``:

* :func:`train`: training on the shared engine, COCO AP every ``eval_every`` epochs and at the end
  (a resumed run whose schedule was already complete evaluates its final weights);
  ``coco_metrics.json``, detections in ``val_results_{bbox,segm}.json``;
* :func:`evaluate_checkpoint` (``eval_only=true``): one checkpoint's COCO AP; ``eval.json``,
  detections in ``eval_results_{bbox,segm}.json``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional, Any, Dict

import torch

from ...engine.rundir import RunFolder
from ...engine import Trainer
from ...engine.distributed import DistInfo
from ...engine.errors import ConfigError
from ...engine.trainer import OptimConfig, TrainerConfig
from .task import DetectionTask, format_metrics

log = logging.getLogger("greenmim")


def train(task: DetectionTask, trainer_cfg: TrainerConfig, optim_cfg: OptimConfig, sched_cfg: Dict[str, Any],
          folder: Optional[RunFolder] = None) -> Dict[str, float]:
    """Train ``task`` (``resume`` included); the last evaluation's metrics, ``{}`` when the run stopped
    before the end of its schedule (a stop signal: it continues with ``resume=auto``)."""
    trainer = Trainer(task, trainer_cfg, optim_cfg, sched_cfg, folder)
    trainer.fit()
    metrics = task.last_metrics
    if not metrics and trainer.step >= trainer.total_steps:
        # resumed a run whose schedule was already complete: evaluate its final weights
        metrics = task.evaluate_model(trainer.model, trainer)
    if trainer.dist.is_main and metrics:
        log.info("COCO metrics: %s", format_metrics(metrics))
        (trainer.output_dir / "coco_metrics.json").write_text(json.dumps(metrics, indent=2))
    elif trainer.dist.is_main:
        log.info("stopped before the end of the schedule: no final evaluation (continue with resume=auto)")
    return metrics


def checkpoint_model_state(path: str) -> Dict[str, torch.Tensor]:
    """The detector weights of a ``greenmim-detect`` checkpoint (or a bare state dict)."""
    from ...weights.loading import read_checkpoint, unwrap_state_dict

    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint '{path}' does not exist: pass a greenmim-detect checkpoint as checkpoint=PATH")
    return unwrap_state_dict(read_checkpoint(path))


def evaluate_checkpoint(task: DetectionTask, checkpoint: str, dist: DistInfo, output_dir: Path) -> Dict[str, float]:
    """COCO AP of the detector in ``checkpoint`` (a ``greenmim-detect`` checkpoint) on the task's
    validation set (all ranks); a checkpoint of another model or dataset is a :class:`ConfigError`."""
    model = task.build_model()
    missing, unexpected = model.load_state_dict(checkpoint_model_state(str(checkpoint)), strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {checkpoint} does not match the detector (missing {len(missing)} e.g. {missing[:2]}, unexpected "
            f"{len(unexpected)} e.g. {unexpected[:2]}): use the model= and data= of the run that wrote it"
        )
    model.to(dist.device)
    log.info("%s", task.data_summary())
    log.info("eval_only: %s on %d images", checkpoint, len(task.val_set))
    metrics = task.coco_metrics(model, dist, output_dir, "eval_")
    if dist.is_main:
        log.info("COCO metrics: %s", format_metrics(metrics))
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "eval.json").write_text(json.dumps({"checkpoint": str(checkpoint), **metrics}, indent=2))
    return metrics
