"""``greenmim-detect``: Mask R-CNN transfer to COCO-format detection / instance segmentation.

A Hydra app over ``configs/detect.yaml`` (packaged as ``greenmim.configs``)::

    greenmim-detect                                               # detect_quick: generated shapes, a few CPU minutes
    torchrun --nproc_per_node=8 -m greenmim.cli.detect experiment=detect_coco_1x model=greenmim_swin_base_w7 \\
        data.root=/data/coco pretrained=runs/pretrain/checkpoints/step-XXXXXXXX.pt output_dir=runs/det_1x
    greenmim-detect experiment=detect_coco_1x data.root=/data/coco eval_only=true output_dir=runs/det_1x

Training runs on the shared engine (:class:`greenmim.engine.Trainer`): DDP under torchrun,
``trainer.precision``, accumulation, warmup + step schedule, atomic checkpoints, ``resume=auto``,
progress lines and TensorBoard. COCO bbox/segm AP is computed every ``eval_every`` epochs and at the
end; ``eval_only=true`` evaluates ``checkpoint=`` (default: the latest checkpoint in ``output_dir``).
Metrics land in ``<output_dir>/metrics.jsonl`` and ``<output_dir>/coco_metrics.json`` (``eval.json``
for ``eval_only``), detections in
``<output_dir>/val_results_{bbox,segm}.json`` (latest evaluation during training) or
``eval_results_{bbox,segm}.json`` (``eval_only``), in COCO results format.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict

import hydra
from omegaconf import DictConfig, OmegaConf

from ..detection.data import coco_paths
from ..detection.synthetic import ensure_synthetic_coco
from ..detection.task import DetectionTask, checkpoint_model_state, evaluate_coco, format_metrics
from ..engine import Trainer, init_distributed, setup_logging
from ..engine.checkpoint import find_latest
from ..engine.distributed import barrier
from ..engine.errors import ConfigError
from .common import CONFIG_PATH, launch, optim_config, run_app, sched_config, to_dict, trainer_config

PROG = "greenmim-detect"
log = logging.getLogger("greenmim")


def prepare_data(data: Dict[str, Any], dist) -> Dict[str, Any]:
    """Fill the four paths from ``data.root`` (standard COCO layout) and generate synthetic data if asked."""
    data = dict(data)
    synthetic = data.get("synthetic")
    if synthetic:
        root = data["root"]
        if dist.is_main:
            ensure_synthetic_coco(root, int(synthetic.get("num_train", 64)), int(synthetic.get("num_val", 16)),
                                  tuple(synthetic.get("size", (160, 192))), int(synthetic.get("seed", 0)))
        barrier()
        for split in ("train", "val"):
            data[f"{split}_images"] = data.get(f"{split}_images") or os.path.join(root, split)
            data[f"{split}_ann"] = data.get(f"{split}_ann") or os.path.join(root, "annotations", f"instances_{split}.json")
    year = str(data.get("year", "2017"))
    for split in ("train", "val"):
        images, ann = coco_paths(data.get("root") or ".", split, year)
        if not data.get(f"{split}_images"):
            data[f"{split}_images"] = images
        if not data.get(f"{split}_ann"):
            data[f"{split}_ann"] = ann
    return data


def detect_optim_config(cfg: DictConfig):
    """The engine's ``OptimConfig`` from ``cfg.optim`` (``layer_decay`` is the task's, not the engine's)."""
    optim = to_dict(cfg.optim)
    optim.pop("layer_decay", None)
    return optim_config(OmegaConf.create({"optim": optim}))


def run(cfg: DictConfig) -> Dict[str, float]:
    """Train (or evaluate) as configured; returns the final COCO metrics (all ranks)."""
    tcfg = trainer_config(cfg)
    dist = init_distributed(tcfg.device)
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    data = prepare_data(to_dict(cfg.data), dist)
    eval_only = bool(cfg.get("eval_only", False))
    task = DetectionTask(to_dict(cfg.model), data, to_dict(cfg.detector), pretrained=cfg.get("pretrained"),
                         use_ema=bool(cfg.get("pretrained_use_ema", False)),
                         layer_decay=float(cfg.optim.get("layer_decay", 1.0) or 1.0),
                         eval_every=int(cfg.get("eval_every", 1)), train=not eval_only)

    if eval_only:
        setup_logging(output_dir, dist.rank)
        ckpt = cfg.get("checkpoint") or (find_latest(output_dir) if output_dir.is_dir() else None)
        if not ckpt:
            raise ConfigError(f"eval_only=true needs checkpoint=PATH (no checkpoint found in {output_dir})")
        model = task.build_model()
        missing, unexpected = model.load_state_dict(checkpoint_model_state(str(ckpt)), strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"checkpoint {ckpt} does not match the detector (missing {len(missing)} e.g. {missing[:2]}, unexpected "
                f"{len(unexpected)} e.g. {unexpected[:2]}): use the model= and data= of the run that wrote it"
            )
        model.to(dist.device)
        log.info("eval_only: %s on %d images", ckpt, len(task.val_set))
        metrics = evaluate_coco(model, task.val_set, dist.device, dist, batch_size=int(data.get("eval_batch_size", 1)),
                                num_workers=int(data.get("num_workers", 0)), output_dir=str(output_dir), prefix="eval_",
                                log_every=int(data.get("eval_log_every", 0) or 0))
    else:
        trainer = Trainer(task, tcfg, detect_optim_config(cfg), sched_config(cfg))
        trainer.fit()
        metrics = task.last_metrics
        if not metrics and trainer.step >= trainer.total_steps:
            # resumed a run whose schedule was already complete: evaluate its final weights
            metrics = task.evaluate_model(trainer.model, trainer)
    if dist.is_main and metrics:
        log.info("COCO metrics: %s", format_metrics(metrics))
        output_dir.mkdir(parents=True, exist_ok=True)
        if eval_only:
            (output_dir / "eval.json").write_text(json.dumps({"checkpoint": str(ckpt), **metrics}, indent=2))
        else:
            (output_dir / "coco_metrics.json").write_text(json.dumps(metrics, indent=2))
    elif dist.is_main:
        log.info("stopped before the end of the schedule: no final evaluation (continue with resume=auto)")
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="detect")
def hydra_main(cfg: DictConfig) -> None:
    run_app(PROG, "detect", cfg, run)


def main() -> None:
    """Console entry point ``greenmim-detect`` (also ``python -m greenmim.cli.detect``)."""
    launch(PROG, "detect", hydra_main)


if __name__ == "__main__":
    main()
