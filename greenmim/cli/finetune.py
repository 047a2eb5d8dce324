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

This file reads the config; the flows are :mod:`greenmim.tasks.finetune.run` (fine-tuning, ``eval_only``)
and :mod:`greenmim.tasks.frozen_eval.run` (``protocol=knn|linear_probe``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import hydra
from omegaconf import DictConfig

from ..engine.rundir import RunFolder
from ..tasks.finetune.run import evaluate_checkpoint, train
from ..tasks.finetune.task import BEST_NAME
from .common import CONFIG_PATH, eval_checkpoint, launch, optim_config, run_app, sched_config, trainer_config

PROG = "greenmim-finetune"


def run(cfg: DictConfig, folder: Optional[RunFolder] = None) -> Dict[str, Any]:
    """Fine-tune, evaluate a checkpoint (``eval_only=true``) or run a frozen-feature protocol, as configured."""
    protocol = cfg.protocol
    if protocol != "finetune":  # knn | linear_probe: frozen-feature evaluation (greenmim.tasks.frozen_eval)
        from ..tasks.frozen_eval.run import run_frozen_eval

        return run_frozen_eval(cfg, folder)
    tcfg = trainer_config(cfg)
    if cfg.eval_only:
        return evaluate_checkpoint(cfg, tcfg, eval_checkpoint(cfg, Path(cfg.output_dir).expanduser().resolve(), prefer=BEST_NAME))
    return train(cfg, tcfg, optim_config(cfg), sched_config(cfg), folder)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="finetune")
def hydra_main(cfg: DictConfig) -> None:
    run_app(PROG, "finetune", cfg, run)


def main() -> None:
    """Console entry point ``greenmim-finetune`` (also ``python -m greenmim.cli.finetune``)."""
    launch(PROG, "finetune", hydra_main)


if __name__ == "__main__":
    main()
