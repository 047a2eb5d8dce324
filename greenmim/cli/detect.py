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

This file reads the config; the COCO paths and a generated set are :mod:`greenmim.tasks.detect.prepare`'s,
the training and ``eval_only`` flows :mod:`greenmim.tasks.detect.run`'s.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import hydra
from omegaconf import DictConfig

from ..engine import init_distributed, setup_logging
from ..engine.checkpoint import check_one_run
from ..engine.rundir import RunFolder
from ..tasks.detect.prepare import prepare_data
from ..tasks.detect.run import evaluate_checkpoint, train
from ..tasks.detect.task import DetectionTask
from .common import CONFIG_PATH, eval_checkpoint, launch, optim_config, run_app, sched_config, to_dict, trainer_config

PROG = "greenmim-detect"


def run(cfg: DictConfig, folder: Optional[RunFolder] = None) -> Dict[str, float]:
    """Train (or evaluate) as configured; returns the final COCO metrics (all ranks)."""
    tcfg = trainer_config(cfg)
    dist = init_distributed(tcfg.device)
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    eval_only = bool(cfg.eval_only)
    if not eval_only and dist.is_main:  # before a synthetic set is generated into output_dir (held by run_app, or made here)
        output_dir.mkdir(parents=True, exist_ok=True)
        check_one_run(output_dir, cfg.resume, None)
    data = prepare_data(to_dict(cfg.data), dist, output_dir, eval_only)
    task = DetectionTask(to_dict(cfg.model), data, to_dict(cfg.detector), pretrained=cfg.pretrained,
                         use_ema=bool(cfg.pretrained_use_ema),
                         layer_decay=float(cfg.optim.layer_decay),
                         eval_every=int(cfg.eval_every), train=not eval_only)
    if eval_only:
        setup_logging(output_dir, dist.rank)
        return evaluate_checkpoint(task, eval_checkpoint(cfg, output_dir), dist, output_dir)
    return train(task, tcfg, optim_config(cfg), sched_config(cfg), folder)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="detect")
def hydra_main(cfg: DictConfig) -> None:
    run_app(PROG, "detect", cfg, run)


def main() -> None:
    """Console entry point ``greenmim-detect`` (also ``python -m greenmim.cli.detect``)."""
    launch(PROG, "detect", hydra_main)


if __name__ == "__main__":
    main()
