"""``greenmim-pretrain`` / ``python -m greenmim.cli.pretrain``: masked image modeling pretraining (Hydra app).

Configs live in ``configs/`` (installed as ``greenmim.configs``); see ``configs/pretrain.yaml`` for the
groups and the documented overrides. Under ``torchrun`` the run is distributed automatically.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..engine import Trainer
from ..engine.rundir import RunFolder
from ..tasks.pretrain.task import PretrainTask
from .common import CONFIG_PATH, launch, optim_config, run_app, sched_config, to_dict, trainer_config

PROG = "greenmim-pretrain"


def warn_if_not_launched(cfg: DictConfig) -> None:
    """``trainer=ddp`` outside torchrun runs a single process: say so."""
    try:
        choice = HydraConfig.get().runtime.choices.get("trainer")
    except ValueError:  # not inside a Hydra app
        return
    if choice == "ddp" and "WORLD_SIZE" not in os.environ:
        print(f"{PROG}: warning: trainer=ddp but not launched with torchrun; running one process "
              "(use: torchrun --nproc_per_node=N -m greenmim.cli.pretrain ...)", file=sys.stderr)


def run(cfg: DictConfig, folder: Optional[RunFolder] = None) -> dict:
    """Pretrain with a composed config in the held run ``folder`` (None: the trainer holds it);
    returns the last epoch's summary (e.g. ``{"loss": ...}``)."""
    warn_if_not_launched(cfg)
    static_plans = True if cfg.trainer.compile is True else None  # a compiled step needs static plan shapes
    task = PretrainTask(to_dict(cfg.model), to_dict(cfg.data), cfg.vis.every_epochs, cfg.vis.num_images, static_plans)
    trainer = Trainer(task, trainer_config(cfg), optim_config(cfg), sched_config(cfg), folder)
    return trainer.fit()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="pretrain")
def hydra_main(cfg: DictConfig) -> None:
    run_app(PROG, "pretrain", cfg, run)


def main() -> None:
    """Console entry point ``greenmim-pretrain`` (also ``python -m greenmim.cli.pretrain``)."""
    launch(PROG, "pretrain", hydra_main)


if __name__ == "__main__":
    main()
