"""The training engine shared by pretraining, fine-tuning and detection.

* :class:`Trainer` — setup, fit, resume, checkpoints around ONE step, :meth:`Trainer.train_step`
  (:mod:`.trainer`: the step's order and the conventions); :class:`TrainTask` — what a task
  provides (:mod:`.task`); :class:`TrainerConfig`, :class:`OptimConfig` — the settings (:mod:`.config`).
* :mod:`.step` — :class:`TrainingStep`, the device part of a step (micro-steps under autocast, the
  finite check on the device, backward with ``no_sync``, the optimizer step skipped on the device,
  zero grads), callable without a Trainer (the benchmark runs it); ``torch.compile``.
* :mod:`.distributed` — torchrun setup, rank-0 writing, seeds, collectives.
* :mod:`.checkpoint` — atomic checkpoints, retention, ``resume=auto|PATH``, the format and its upgrades.
* :mod:`.rundir` — the run folder's one owner (:func:`~.rundir.run_folder`): checked, locked, handed on.
* :mod:`.optim`, :mod:`.schedule`, :mod:`.precision` — AdamW groups, lr schedules, autocast dtype and fp16 scaler.
* :mod:`.sampler` — resumable distributed sampler and per-sample augmentation seeds.
* :mod:`.monitor` — logging, TensorBoard, throughput.
* :mod:`.signals` — graceful stop on SIGTERM / SIGINT / SIGUSR1 (preemption).
* :mod:`.threads` — CPU intra-op threads left free for the loader workers.
* :mod:`.workers` — loader worker processes shut down when ``fit`` ends and at exit (no hang after an error).
"""
from .checkpoint import CheckpointManager, atomic_save, find_latest, load_checkpoint, resolve_resume, upgrade_checkpoint
from .distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_object,
    cleanup_distributed,
    init_distributed,
    seed_everything,
)
from .errors import ConfigError, NonFiniteLossError, Preempted, UserError, one_line
from .monitor import MetricsWriter, setup_logging
from .optim import build_optimizer, default_param_groups, no_weight_decay_names, scaled_lr
from .precision import Precision
from .sampler import ResumableDistributedSampler, SeededDataset
from .schedule import SCHEDULES, LRSchedule, WarmupCosine, WarmupStep, apply_lr, build_schedule
from .config import OptimConfig, TrainerConfig
from .task import TrainTask
from .step import StepOutput, TrainingStep, compile_model
from .trainer import Trainer, enable_grad_checkpointing, unwrap

__all__ = [
    "Trainer", "TrainerConfig", "OptimConfig", "TrainTask", "TrainingStep", "StepOutput", "compile_model", "unwrap", "enable_grad_checkpointing",
    "DistInfo", "init_distributed", "cleanup_distributed", "barrier", "all_reduce_mean",
    "broadcast_object", "seed_everything",
    "CheckpointManager", "atomic_save", "load_checkpoint", "upgrade_checkpoint", "find_latest", "resolve_resume",
    "build_optimizer", "default_param_groups", "no_weight_decay_names", "scaled_lr",
    "LRSchedule", "WarmupCosine", "WarmupStep", "SCHEDULES", "build_schedule", "apply_lr",
    "Precision", "ResumableDistributedSampler", "SeededDataset",
    "MetricsWriter", "setup_logging",
    "UserError", "ConfigError", "NonFiniteLossError", "Preempted", "one_line",
]
