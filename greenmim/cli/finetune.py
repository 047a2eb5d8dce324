"""``greenmim-finetune`` / ``python -m greenmim.cli.finetune``: image classification fine-tuning (Hydra app).

Configs: ``configs/finetune.yaml`` (installed as ``greenmim.configs``) with the shared groups
(``model/`` as in pretraining, ``data/imagenet_cls``, ``optim/adamw_finetune``, ``sched/cosine_finetune``,
``trainer/``, ``experiment/finetune_*``)::

    greenmim-finetune experiment=finetune_quick data.root=/data/hymenoptera pretrained=PATH output_dir=runs/ft
    torchrun --nproc_per_node=8 -m greenmim.cli.finetune experiment=finetune_swin_base_w7 data.root=/datasets/imagenet pretrained=PATH
    greenmim-finetune experiment=finetune_quick data.root=/data/hymenoptera output_dir=runs/ft eval_only=true
    greenmim-finetune experiment=knn data.root=/data/hymenoptera pretrained=PATH          # frozen features: k-NN
    greenmim-finetune experiment=linear_probe data.root=/data/hymenoptera pretrained=PATH # frozen features: linear probe

Training runs on the shared engine (:class:`greenmim.engine.Trainer`): DDP under torchrun,
``trainer.precision``, accumulation, clipping, warmup + cosine per step, atomic checkpoints
(``checkpoints/step-*.pt``, the last; ``checkpoints/best.pt``, the best validation top-1),
``resume=auto``, progress lines with img/s and ETA, TensorBoard and ``metrics.jsonl``. At the end,
``results.json`` holds the last and best validation metrics. ``eval_only=true`` evaluates
``checkpoint=`` (default: ``output_dir/checkpoints/best.pt``, else the latest checkpoint) and writes
``eval.json``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional

import hydra
from omegaconf import DictConfig

from ..engine import MetricsWriter, Precision, Trainer, init_distributed, setup_logging
from ..engine.errors import ConfigError
from ..engine.rundir import RunFolder
from ..weights.loading import load_pretrained, read_checkpoint
from ..tasks.finetune.data import build_classification_data
from ..tasks.finetune.evaluate import build_eval_loader, describe_accuracy, evaluate
from ..tasks.finetune.model import create_classifier
from ..tasks.finetune.task import BEST_NAME, FinetuneTask, check_validation_images, model_kwargs
from .common import CONFIG_PATH, eval_checkpoint, launch, optim_config, run_app, sched_config, trainer_config

PROG = "greenmim-finetune"
log = logging.getLogger("greenmim")


def train(cfg: DictConfig, folder: Optional[RunFolder] = None) -> Dict[str, Any]:
    """Fine-tune as configured; returns ``{"last": {...}, "best": {...}}`` validation metrics (all ranks)."""
    t0 = time.time()
    task = FinetuneTask(cfg)
    trainer = Trainer(task, trainer_config(cfg), optim_config(cfg), sched_config(cfg), folder)
    trainer.fit()
    results = {
        "last": dict(task.last_metrics, epoch=trainer.epoch, step=trainer.step),
        "best": dict(task.best),
        "num_classes": task.num_classes,
        "train_images": len(task.data.train),
        "val_images": len(task.data.val),
        "pretrained": cfg.get("pretrained"),
        "load_report": task.load_report.to_dict() if task.load_report else None,
        "wall_s": time.time() - t0,
    }
    if trainer.dist.is_main:
        (trainer.output_dir / "results.json").write_text(json.dumps(results, indent=2))
        if task.last_metrics:
            log.info("val %s (best top-1 %.2f%% at epoch %d); results in %s", describe_accuracy(task.last_metrics, "val_"),
                     task.best["acc1"], task.best["epoch"], trainer.output_dir / "results.json")
    return results


def evaluate_only(cfg: DictConfig) -> Dict[str, Any]:
    """Evaluate a checkpoint on the validation split (distributed under torchrun); returns the metrics."""
    tcfg = trainer_config(cfg)
    dist = init_distributed(tcfg.device)
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    setup_logging(output_dir, dist.rank)
    data = build_classification_data(cfg.data, cfg.aug, need_train=False)
    check_validation_images(data)
    path = eval_checkpoint(cfg, output_dir, prefer=BEST_NAME)
    raw = read_checkpoint(path)
    classes = raw.get("classes")
    if classes is not None and list(classes) != data.classes:
        raise ConfigError(f"{path} was trained on classes {classes[:5]}... but data.root has {data.classes[:5]}...: evaluate it on its own dataset")
    model, _ = create_classifier(cfg.model.name, data.num_classes, drop_path_rate=0.0, **model_kwargs(cfg))
    report = load_pretrained(model, path, use_ema=bool(cfg.eval_ema), allow_missing_head=False, checkpoint=raw)
    model.to(dist.device)
    d = cfg.data
    loader = build_eval_loader(data.val, int(d.get("eval_batch_size") or d.batch_size), int(d.num_workers),
                               dist.rank, dist.world_size, pin_memory=dist.device.type == "cuda")
    t0 = time.time()
    metrics = evaluate(model, loader, dist.device, Precision(tcfg.precision, dist.device).autocast)
    result = {"checkpoint": path, "ema": bool(cfg.eval_ema), **metrics, "wall_s": time.time() - t0}
    if dist.is_main:
        log.info("eval %s (%s): %s, loss %.4f on %d images", path, report.kind, describe_accuracy(metrics), metrics["loss"], metrics["count"])
        (output_dir / "eval.json").write_text(json.dumps(result, indent=2))
        writer = MetricsWriter(output_dir, tensorboard=tcfg.tensorboard)
        writer.add_scalars(0, {k: v for k, v in metrics.items() if k != "count"}, prefix="eval")
        writer.close()
    return result


def run(cfg: DictConfig, folder: Optional[RunFolder] = None) -> Dict[str, Any]:
    protocol = cfg.get("protocol", "finetune")
    if protocol != "finetune":  # knn | linear_probe: frozen-feature evaluation (greenmim.tasks.frozen_eval)
        from ..tasks.frozen_eval.run import run_frozen_eval

        return run_frozen_eval(cfg, folder)
    return evaluate_only(cfg) if cfg.get("eval_only", False) else train(cfg, folder)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="finetune")
def hydra_main(cfg: DictConfig) -> None:
    run_app(PROG, "finetune", cfg, run)


def main() -> None:
    """Console entry point ``greenmim-finetune`` (also ``python -m greenmim.cli.finetune``)."""
    launch(PROG, "finetune", hydra_main)


if __name__ == "__main__":
    main()
