"""How to train: the ``trainer.*`` and ``optim.*`` settings of a :class:`~greenmim.engine.Trainer`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

NONFINITE_POLICIES = ("stop", "skip")


@dataclass
class TrainerConfig:
    """How to train. Every field is a ``trainer.*`` config key (``output_dir``, ``resume`` and
    ``seed`` are top-level keys in the Hydra configs and are copied in by the CLI).

    Attributes:
        output_dir: the run's folder (checkpoints, ``train.log``, ``metrics.jsonl``, ``tb/``, images).
        epochs: epochs to train (the schedule's length unless ``max_steps`` is smaller).
        max_steps: cap on optimizer steps; > 0 also shortens the schedule to it. -1: no cap.
        stop_at_step: stop (after checkpointing) at this step without changing the schedule, e.g.
            to split a long schedule into time-boxed jobs continued with ``resume=auto``.
        accum_steps: micro-batches per optimizer step (gradient accumulation).
        precision: ``bf16`` | ``fp16`` (with loss scaling) | ``fp32``.
        device: ``auto`` | ``cpu`` | ``cuda``.
        clip_grad: max total gradient norm, or None for no clipping.
        grad_checkpointing: activation checkpointing: False, True (all stages) or a list of stage
            indices; applied to ``model.encoder`` if the model has one, else to the model.
        nonfinite: on a NaN/Inf loss, ``stop`` (raise, keeping the last good checkpoint) or ``skip``
            the step (no update; warned and counted).
        log_every: steps between progress lines and TensorBoard scalars.
        ckpt_every_steps: also checkpoint every this many steps (0: only at epoch ends).
        ckpt_every_epochs: checkpoint at the end of every this many epochs (and always at the end).
        keep_last: rolling checkpoints to keep.
        keep_every_epochs: keep a permanent copy every this many epochs (0: none).
        tensorboard: write TensorBoard event files.
        seed: base seed; rank ``r`` uses ``seed + r`` for its own streams.
        resume: None (fresh run), ``auto`` (latest valid checkpoint in ``output_dir``, if any) or a path.
        find_unused_parameters: passed to DDP.
        compile: compile the model's forward and backward once with ``torch.compile``
            (:mod:`greenmim.engine.step`); best with static plans.
        compile_mode: ``auto`` (CUDA graphs on one CUDA process without accumulation, else
            ``default``) or a ``torch.compile`` mode.
        config: the resolved full config, stored in checkpoints and written to ``config.yaml``.
    """

    output_dir: str = "outputs/run"
    epochs: int = 1
    max_steps: int = -1
    stop_at_step: Optional[int] = None
    accum_steps: int = 1
    precision: str = "fp32"
    device: str = "auto"
    clip_grad: Optional[float] = None
    grad_checkpointing: Union[bool, List[int]] = False
    nonfinite: str = "stop"
    log_every: int = 10
    ckpt_every_steps: int = 0
    ckpt_every_epochs: int = 1
    keep_last: int = 2
    keep_every_epochs: int = 0
    tensorboard: bool = True
    seed: int = 0
    resume: Optional[str] = None
    find_unused_parameters: bool = False
    compile: bool = False
    compile_mode: str = "auto"
    config: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """AdamW settings (``optim.*``): ``lr`` (absolute, wins when set) or ``blr`` scaled by
    ``effective_batch / base_batch``; ``weight_decay``, ``betas``, ``eps``."""

    name: str = "adamw"
    blr: float = 1.5e-4
    lr: Optional[float] = None
    base_batch: int = 256
    weight_decay: float = 0.05
    betas: Sequence[float] = (0.9, 0.95)
    eps: float = 1e-8

