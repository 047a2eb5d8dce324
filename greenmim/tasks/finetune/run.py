"""The two flows of ``greenmim-finetune protocol=finetune``; each returns what it writes (rank 0)
into the run's ``output_dir``, on every rank:

* :func:`train`: fine-tuning on the shared engine; ``results.json`` holds the last and the best
  validation metrics, the data sizes and the pretrained weights' load report;
* :func:`evaluate_checkpoint` (``eval_only=true``): one checkpoint's validation metrics (distributed
  under torchrun); ``eval.json``, and ``eval/*`` scalars in ``metrics.jsonl`` (and TensorBoard).

(``protocol=knn|linear_probe`` is :func:`greenmim.tasks.frozen_eval.run.run_frozen_eval`.)
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional, Any, Dict

from omegaconf import DictConfig

from ...engine.rundir import RunFolder
from ...engine import MetricsWriter, Precision, Trainer, init_distributed, setup_logging
from ...engine.errors import ConfigError
from ...engine.trainer import OptimConfig, TrainerConfig
from ...weights.loading import load_pretrained, read_checkpoint
from .data import build_classification_data
from .evaluate import build_eval_loader, describe_accuracy, evaluate
from .model import create_classifier
from .task import FinetuneTask, check_validation_images, model_kwargs

log = logging.getLogger("greenmim")


def train(cfg: DictConfig, trainer_cfg: TrainerConfig, optim_cfg: OptimConfig, sched_cfg: Dict[str, Any],
          folder: Optional[RunFolder] = None) -> Dict[str, Any]:
    """Fine-tune as configured; returns ``{"last": {...}, "best": {...}}`` validation metrics (all ranks)."""
    t0 = time.time()
    task = FinetuneTask(cfg)
    trainer = Trainer(task, trainer_cfg, optim_cfg, sched_cfg, folder)
    trainer.fit()
    results = {
        "last": dict(task.last_metrics, epoch=trainer.epoch, step=trainer.step),
        "best": dict(task.best),
        "num_classes": task.num_classes,
        "train_images": len(task.data.train),
        "val_images": len(task.data.val),
        "pretrained": cfg.pretrained,
        "load_report": task.load_report.to_dict() if task.load_report else None,
        "wall_s": time.time() - t0,
    }
    if trainer.dist.is_main:
        (trainer.output_dir / "results.json").write_text(json.dumps(results, indent=2))
        if task.last_metrics:
            log.info("val %s (best top-1 %.2f%% at epoch %d); results in %s", describe_accuracy(task.last_metrics, "val_"),
                     task.best["acc1"], task.best["epoch"], trainer.output_dir / "results.json")
    return results


def evaluate_checkpoint(cfg: DictConfig, trainer_cfg: TrainerConfig, checkpoint: str) -> Dict[str, Any]:
    """Validation metrics of the classifier in ``checkpoint`` (``{"checkpoint", "ema", "loss", "acc1"[,
    "acc5"], "count", "wall_s"}``, all ranks); a checkpoint of other classes is a :class:`ConfigError`."""
    dist = init_distributed(trainer_cfg.device)
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    setup_logging(output_dir, dist.rank)
    data = build_classification_data(cfg.data, cfg.aug, need_train=False)
    check_validation_images(data)
    raw = read_checkpoint(checkpoint)
    classes = raw.get("classes")
    if classes is not None and list(classes) != data.classes:
        raise ConfigError(f"{checkpoint} was trained on classes {classes[:5]}... but data.root has {data.classes[:5]}...: evaluate it on its own dataset")
    model, _ = create_classifier(cfg.model.name, data.num_classes, drop_path_rate=0.0, **model_kwargs(cfg))
    report = load_pretrained(model, checkpoint, use_ema=bool(cfg.eval_ema), allow_missing_head=False, checkpoint=raw)
    model.to(dist.device)
    d = cfg.data
    loader = build_eval_loader(data.val, int(d.eval_batch_size or d.batch_size), int(d.num_workers),
                               dist.rank, dist.world_size, pin_memory=dist.device.type == "cuda")
    t0 = time.time()
    metrics = evaluate(model, loader, dist.device, Precision(trainer_cfg.precision, dist.device).autocast)
    result = {"checkpoint": checkpoint, "ema": bool(cfg.eval_ema), **metrics, "wall_s": time.time() - t0}
    if dist.is_main:
        log.info("eval %s (%s): %s, loss %.4f on %d images", checkpoint, report.kind, describe_accuracy(metrics), metrics["loss"], metrics["count"])
        (output_dir / "eval.json").write_text(json.dumps(result, indent=2))
        writer = MetricsWriter(output_dir, tensorboard=trainer_cfg.tensorboard)
        writer.add_scalars(0, {k: v for k, v in metrics.items() if k != "count"}, prefix="eval")
        writer.close()
    return result
