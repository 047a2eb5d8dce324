"""The training loop shared by pretraining, fine-tuning and detection.

A :class:`Trainer` runs a :class:`TrainTask`; the task says *what* to train (model, data, the loss
of one batch), the trainer says *how* (devices, DDP, precision, accumulation, lr schedule,
checkpoints, resume, logging). Minimal use::

    class MyTask(TrainTask):
        def build_model(self):                      return MyModel()
        def build_train_loader(self, dist, seed):   return DataLoader(ds, batch_size=32, sampler=...)
        def training_step(self, model, batch, trainer):
            images, _ = batch
            loss, _, _ = model(images.to(trainer.device, non_blocking=True))
            return loss, {}

    Trainer(MyTask(), TrainerConfig(output_dir="runs/x", epochs=10),
            OptimConfig(blr=1.5e-4), {"name": "cosine", "warmup_epochs": 1}).fit()

Conventions:

* A *step* is one optimizer update (``accum_steps`` micro-batches). ``max_steps``, warmup,
  checkpoint intervals and TensorBoard's x axis count steps.
* ``lr = optim.lr`` if set, else ``optim.blr * effective_batch / 256`` with
  ``effective_batch = batch_size * accum_steps * world_size``.
* The loader's sampler should be a :class:`~greenmim.engine.sampler.ResumableDistributedSampler`
  (any sampler with ``set_epoch`` works, but then a mid-epoch resume replays the epoch's batches
  from the start of the epoch instead of skipping exactly the consumed ones).
* Only rank 0 writes; every rank calls every hook (they may contain collectives).
* Nothing is lost: ``output_dir`` is checked (writable, no other run's checkpoints unless resuming)
  before anything is written; an epoch's checkpoint is written before its evaluation; a stop signal
  (SIGTERM, SIGINT, SIGUSR1) during :meth:`Trainer.fit` ends it after the current step with a
  checkpoint and :class:`~greenmim.engine.errors.Preempted` (see :mod:`greenmim.engine.signals`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as tdist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import (
    FORMAT,
    CheckpointManager,
    check_one_run,
    check_output_dir,
    checkpoint_step,
    load_checkpoint,
    resolve_resume,
    scan_latest,
    set_aside,
    write_error,
)
from .distributed import (
    DistInfo,
    all_reduce_all_finite,
    all_reduce_max,
    all_reduce_mean,
    broadcast_object,
    get_rng_state,
    init_distributed,
    is_dist,
    seed_everything,
    set_rng_state,
)
from .errors import ConfigError, NonFiniteLossError, Preempted, UserError, one_line
from .monitor import MetricsWriter, Throughput, format_eta, peak_memory_gb, setup_logging
from .optim import build_optimizer, scaled_lr
from .precision import Precision
from .schedule import LRSchedule, apply_lr, build_schedule
from .signals import StopSignals, with_ignored_stop_signals

log = logging.getLogger("greenmim")


def leave_cores_for_loader_workers(num_workers: int, world_size: int) -> None:
    """On CPU, give torch's intra-op threads only the cores that data-loader workers and other ranks
    leave free. Oversubscribed OpenMP threads spin-wait on each other: a Swin-T step with 2 threads
    and one loader worker on 2 cores ran 5x slower than with 1 thread. An explicit OMP_NUM_THREADS wins."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    free = max(1, (os.cpu_count() or 1) // max(world_size, 1) - num_workers)
    if free < torch.get_num_threads():
        log.info("cpu: %d intra-op thread(s), leaving cores to %d loader worker(s) (set OMP_NUM_THREADS to override)",
                 free, num_workers)
        torch.set_num_threads(free)

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


class TrainTask:
    """What to train. Subclass and implement the first three methods; the others are optional hooks.

    Every method receives the :class:`Trainer` (``trainer.device``, ``trainer.dist``,
    ``trainer.output_dir``, ``trainer.epoch``, ``trainer.step``, ``trainer.writer``, ``trainer.precision``).
    """

    def build_model(self) -> nn.Module:
        """The model, on CPU; the trainer moves it to the device and wraps it in DDP."""
        raise NotImplementedError

    def build_train_loader(self, dist: DistInfo, seed: int) -> torch.utils.data.DataLoader:
        """The training loader of this rank (shard with ``dist.rank``/``dist.world_size``; the
        trainer calls ``loader.sampler.set_epoch(epoch)`` and, on resume, ``set_start(n)``).
        Its ``batch_size`` is the per-process micro-batch."""
        raise NotImplementedError

    def training_step(self, model: nn.Module, batch: Any, trainer: "Trainer") -> Tuple[torch.Tensor, Dict[str, float]]:
        """Loss of one micro-batch (a scalar tensor, run under autocast) and extra metrics to log.
        ``model`` is the (possibly DDP-wrapped) training model; move ``batch`` to ``trainer.device``."""
        raise NotImplementedError

    def batch_size(self, batch: Any) -> int:
        """Samples in ``batch`` (for img/s): the length of the first tensor found."""
        if torch.is_tensor(batch):
            return batch.shape[0]
        if isinstance(batch, (list, tuple)):
            return self.batch_size(batch[0])
        if isinstance(batch, dict):
            return self.batch_size(next(iter(batch.values())))
        return len(batch)

    def param_groups(self, model: nn.Module, weight_decay: float) -> Optional[List[Dict[str, Any]]]:
        """Optimizer param groups (e.g. timm's ``param_groups_layer_decay``; a group's ``lr_scale``
        multiplies its lr). None: the default decay / no-decay split."""
        return None

    def evaluate(self, model: nn.Module, trainer: "Trainer") -> Dict[str, float]:
        """Validation metrics, called on every rank at the end of every ``eval_every`` epoch; return
        values already reduced over ranks. ``model`` is unwrapped and in eval mode."""
        return {}

    def on_epoch_end(self, model: nn.Module, trainer: "Trainer") -> None:
        """Anything per epoch (e.g. a reconstruction figure; write only when ``trainer.dist.is_main``)."""

    def on_step_end(self, model: nn.Module, trainer: "Trainer") -> None:
        """After every optimizer step (``trainer.step`` already counts it), e.g. a model EMA update.
        ``model`` is unwrapped."""

    def state_dict(self) -> Dict[str, Any]:
        """Per-rank task state to checkpoint (e.g. a mask generator's RNG state)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (called on resume with this rank's saved state)."""

    def shared_state_dict(self) -> Dict[str, Any]:
        """Task state identical on every rank (e.g. EMA weights), stored once (rank 0's copy)."""
        return {}

    def load_shared_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`shared_state_dict` (called on resume on every rank)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def enable_grad_checkpointing(model: nn.Module, stages: Union[bool, Sequence[int]]) -> None:
    """Activation checkpointing on ``model.encoder`` (or ``model``): all stages (True) or the listed ones."""
    if stages is False or stages is None or (isinstance(stages, (list, tuple)) and not stages):
        return
    target = getattr(model, "encoder", model)
    if stages is True:
        if not hasattr(target, "set_grad_checkpointing"):
            raise ConfigError(f"{type(target).__name__} does not support trainer.grad_checkpointing")
        target.set_grad_checkpointing(True)
        return
    layers = getattr(target, "layers", None) or getattr(target, "stages", None)
    if layers is None:
        raise ConfigError(f"{type(target).__name__} has no per-stage layers; use trainer.grad_checkpointing=true")
    for i in stages:
        if not 0 <= int(i) < len(layers):
            raise ConfigError(f"trainer.grad_checkpointing: stage {i} out of range (the model has {len(layers)} stages)")
        layers[int(i)].grad_checkpointing = True


class Trainer:
    """Runs a :class:`TrainTask` (see the module docstring). Call :meth:`fit` once.

    After :meth:`setup` (called by :meth:`fit`): ``dist``, ``device``, ``output_dir``, ``model`` (the
    training model, DDP-wrapped when distributed), ``optimizer``, ``schedule``, ``precision``,
    ``loader``, ``writer``, ``peak_lr``, ``effective_batch``, ``steps_per_epoch``, ``total_steps``;
    during training: ``epoch`` (0-based), ``step`` (optimizer steps done).
    """

    def __init__(self, task: TrainTask, cfg: TrainerConfig, optim: Optional[OptimConfig] = None, sched: Optional[Dict[str, Any]] = None):
        if cfg.nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"trainer.nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got '{cfg.nonfinite}'")
        if cfg.accum_steps < 1:
            raise ConfigError(f"trainer.accum_steps must be >= 1, got {cfg.accum_steps}")
        self.task = task
        self.cfg = cfg
        self.optim_cfg = optim or OptimConfig()
        self.sched_cfg = dict(sched or {"name": "cosine", "warmup_epochs": 0})
        self.epoch = 0
        self.step = 0
        self.batch_in_epoch = 0
        self.skipped_steps = 0
        self.last_checkpoint: Optional[Path] = None
        self.signals: Optional[StopSignals] = None  # installed while fit() runs
        self.history: List[Dict[str, float]] = []  # per-epoch summaries

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.dist = init_distributed(cfg.device)
        self.device = self.dist.device
        self.output_dir = Path(broadcast_object(str(Path(cfg.output_dir).expanduser().resolve())))
        # resolved on rank 0 and shared, errors included, so that no rank waits for a failed one
        error, resume, unreadable = None, None, []
        if self.dist.is_main:
            try:
                resume, unreadable = self._resolve_output_dir()
            except UserError as exc:
                error = str(exc)
        error, self._resume_path = broadcast_object((error, str(resume) if resume else None))
        if error:
            raise UserError(error)
        setup_logging(self.output_dir, self.dist.rank)
        if unreadable:
            set_aside(unreadable)
        self.precision = Precision(cfg.precision, self.device)

        seed_everything(cfg.seed)  # the same initial weights whatever the world size
        model = self.task.build_model()
        seed_everything(cfg.seed, self.dist.rank)  # then per-rank streams (dropout, masks, ...)
        enable_grad_checkpointing(model, cfg.grad_checkpointing)
        model.to(self.device)
        self.loader = self.task.build_train_loader(self.dist, cfg.seed)
        self.loader.worker_init_fn = with_ignored_stop_signals(self.loader.worker_init_fn)
        if self.device.type == "cpu":
            leave_cores_for_loader_workers(self.loader.num_workers, self.dist.world_size)
        micro_batch = self.loader.batch_size or 1
        self.effective_batch = micro_batch * cfg.accum_steps * self.dist.world_size
        self.steps_per_epoch = len(self.loader) // cfg.accum_steps
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"an epoch has {len(self.loader)} batch(es) per process, fewer than trainer.accum_steps={cfg.accum_steps}: "
                "use more images, a smaller data.batch_size or fewer accumulation steps"
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps and cfg.max_steps > 0:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)

        o = self.optim_cfg
        self.peak_lr = float(o.lr) if o.lr is not None else scaled_lr(o.blr, self.effective_batch, o.base_batch)
        groups = self.task.param_groups(model, o.weight_decay)
        self.optimizer = build_optimizer(model, self.peak_lr, o.weight_decay, o.betas, o.eps, o.name, groups)
        self.schedule: LRSchedule = build_schedule(self.sched_cfg, self.total_steps, self.steps_per_epoch)

        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=cfg.find_unused_parameters)
        self.model = model
        self.writer = MetricsWriter(self.output_dir, enabled=self.dist.is_main, tensorboard=cfg.tensorboard)
        self.checkpoints = CheckpointManager(self.output_dir, cfg.keep_last, cfg.keep_every_epochs)

        resume = self._resume_path
        if resume:
            self.load(resume)
        elif cfg.resume and str(cfg.resume) == "auto":
            log.info("resume=auto: no checkpoint in %s, starting from scratch", self.output_dir)

        self._write_config()
        n_params = sum(p.numel() for p in unwrap(self.model).parameters())
        log.info(
            "device %s x%d | precision %s | params %.2fM | micro-batch %d x accum %d x world %d = %d | lr %.3g | "
            "%d steps (%d/epoch, %d epochs) | output %s",
            self.device, self.dist.world_size, cfg.precision, n_params / 1e6, micro_batch, cfg.accum_steps,
            self.dist.world_size, self.effective_batch, self.peak_lr, self.total_steps, self.steps_per_epoch,
            self.epochs, self.output_dir,
        )

    def _resolve_output_dir(self) -> Tuple[Optional[Path], List[Tuple[Path, str]]]:
        """Rank 0, before anything is written: check ``output_dir`` is writable, resolve ``resume``
        and refuse to mix runs. Returns ``(checkpoint to resume, [(newer unreadable checkpoint, why)])``."""
        cfg = self.cfg
        check_output_dir(self.output_dir)
        unreadable: List[Tuple[Path, str]] = []
        if str(cfg.resume) == "auto":
            resume, unreadable = scan_latest(self.output_dir)
        else:
            resume = resolve_resume(cfg.resume, self.output_dir)
        check_one_run(self.output_dir, cfg.resume, resume, ignore=[p for p, _ in unreadable])
        return resume, unreadable

    def _write_config(self) -> None:
        """``config.yaml`` (rank 0), once the model, data and optimizer were built from it."""
        if self.dist.is_main and self.cfg.config:
            from omegaconf import OmegaConf

            text = OmegaConf.to_yaml(OmegaConf.create(self.cfg.config))
            try:
                (self.output_dir / "config.yaml").write_text(text)
            except OSError as exc:
                raise write_error(exc, self.output_dir / "config.yaml") from exc

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """The full training state; collective (every rank must call it: per-rank RNG is gathered)."""
        rank_state = {"rng": get_rng_state(), "task": self.task.state_dict()}
        if is_dist():
            gathered: List[Any] = [None] * self.dist.world_size
            tdist.all_gather_object(gathered, rank_state)
        else:
            gathered = [rank_state]
        return {
            "format": FORMAT,
            "version": 1,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.precision.state_dict(),
            "schedule": {"step": self.step, "total_steps": self.total_steps, "peak_lr": self.peak_lr},
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "skipped_steps": self.skipped_steps,
            "world_size": self.dist.world_size,
            "rank_states": gathered,
            "task_shared": self.task.shared_state_dict(),
            "config": self.cfg.config,
        }

    def save(self, epoch_completed: Optional[int] = None) -> None:
        """Write a checkpoint of the current state (rank 0; collective). ``epoch_completed`` (1-based):
        the checkpoint ends that epoch, so it records the start of the next one as its position."""
        state = self.state_dict()
        if epoch_completed is not None:
            state["epoch"], state["batch_in_epoch"] = int(epoch_completed), 0
        error, path = None, None
        if self.dist.is_main:
            try:
                path = str(self.checkpoints.save(state, self.step, epoch_completed))
                log.info("saved checkpoint %s", path)
            except UserError as exc:  # e.g. a full disk: every rank stops with the same message
                error = str(exc)
        error, path = broadcast_object((error, path))  # every rank knows the last checkpoint (same decisions)
        if error:
            raise UserError(error)
        self.last_checkpoint = Path(path)

    def load(self, path: Union[str, Path]) -> None:
        """Restore everything :meth:`state_dict` saved (model, optimizer, scaler, position, RNG)."""
        ckpt = load_checkpoint(path, map_location="cpu")
        fix = "resume with the same model= (and model.encoder_args) as the run that wrote it"
        try:
            missing, unexpected = unwrap(self.model).load_state_dict(ckpt["model"], strict=False)
        except RuntimeError as exc:  # shape mismatches
            sizes = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
            raise UserError(f"checkpoint {path} does not match the model ({len(sizes)} shape mismatch(es), e.g. "
                            f"{sizes[0] if sizes else one_line(exc)}): {fix}") from None
        if missing or unexpected:
            raise UserError(
                f"checkpoint {path} does not match the model (missing {len(missing)} keys e.g. {missing[:2]}, "
                f"unexpected {len(unexpected)} e.g. {unexpected[:2]}): {fix}"
            )
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise UserError(f"the optimizer state of {path} does not match this run's parameter groups ({one_line(exc)}): {fix}") from None
        self.precision.load_state_dict(ckpt.get("scaler"))
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.batch_in_epoch = int(ckpt.get("batch_in_epoch", 0))
        self.skipped_steps = int(ckpt.get("skipped_steps", 0))
        self.task.load_shared_state_dict(ckpt.get("task_shared") or {})
        states = ckpt.get("rank_states") or []
        if len(states) == self.dist.world_size:
            set_rng_state(states[self.dist.rank]["rng"])
            self.task.load_state_dict(states[self.dist.rank]["task"])
        else:
            log.warning(
                "checkpoint was written by %d process(es), this run has %d: RNG streams are re-seeded, "
                "so the run continues correctly but not bit-identically", len(states), self.dist.world_size,
            )
            seed_everything(self.cfg.seed + 1000 * self.step, self.dist.rank)
        self.last_checkpoint = Path(path)
        log.info("resumed from %s (epoch %d, step %d, batch %d of the epoch)", path, self.epoch, self.step, self.batch_in_epoch)

    # ------------------------------------------------------------------ training
    def fit(self) -> Dict[str, float]:
        """Set up, train to ``total_steps`` (or ``stop_at_step``), return the last epoch's summary."""
        self.setup()
        try:
            with StopSignals() as self.signals:
                while self.epoch < self.epochs and not self._should_stop():
                    summary = self.train_one_epoch()
                    if summary:
                        self.history.append(summary)
                    if not self._should_stop():
                        self._stop_if_signalled()
        finally:
            self.writer.close()
        log.info("done: %d steps, output in %s", self.step, self.output_dir)
        return self.history[-1] if self.history else {}

    def _stop_if_signalled(self) -> None:
        """After a step or an epoch: if a stop signal reached any rank, checkpoint (all ranks) and raise
        :class:`Preempted`. The flag is all-reduced so that every rank stops at the same step."""
        pending = (self.signals.requested or 0) if self.signals is not None else 0
        signum = all_reduce_max(pending, self.device)
        if not signum:
            return
        if self.last_checkpoint is None or checkpoint_step(self.last_checkpoint) != self.step:
            self.save()
        name = signal.Signals(signum).name
        message = (f"stopped by {name} at step {self.step}: saved {self.last_checkpoint}; "
                   "continue with the same command and resume=auto")
        log.warning(message)
        raise Preempted(message, signum)

    def _should_stop(self) -> bool:
        stop_at = self.cfg.stop_at_step
        return self.step >= self.total_steps or (stop_at is not None and self.step >= stop_at)

    def _sampler_start(self, start_batch: int) -> int:
        """Position the sampler at this epoch (and at ``start_batch`` when resuming); returns the
        number of batches the loader will skip by itself (0 when it had to replay them)."""
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        if start_batch and hasattr(sampler, "set_start"):
            sampler.set_start(start_batch * (self.loader.batch_size or 1))
            return start_batch
        return 0

    def train_one_epoch(self) -> Dict[str, float]:
        """One epoch. Nothing in a step reads a device value on the host: losses, non-finite flags and
        gradient norms stay on the device (:class:`_DeviceLog`) until a log line or a checkpoint is
        due, so on a GPU the host queues the next step while the current one runs."""
        cfg, accum = self.cfg, self.cfg.accum_steps
        model, task = self.model, self.task
        model.train()
        start_batch = self.batch_in_epoch
        skipped_by_sampler = self._sampler_start(start_batch)
        end_batch = self.steps_per_epoch * accum
        meter = Throughput()
        pending = _DeviceLog()
        epoch_loss_sum, epoch_loss_n = 0.0, 0
        lr = apply_lr(self.optimizer, self.peak_lr, self.schedule.factor(self.step))

        for i, batch in enumerate(self.loader, start=skipped_by_sampler):
            if i < start_batch:  # replaying a sampler without set_start
                continue
            if i >= end_batch or self._should_stop():
                break
            micro = i % accum
            last_micro = micro == accum - 1
            if micro == 0:
                lr = apply_lr(self.optimizer, self.peak_lr, self.schedule.factor(self.step))
                window = _Window(self.device)
            sync = contextlib.nullcontext() if (last_micro or not isinstance(model, DistributedDataParallel)) else model.no_sync()
            with sync:
                with self.precision.autocast():
                    loss, metrics = task.training_step(model, batch, self)
                finite = all_reduce_all_finite(loss.detach())  # every rank takes the same decision
                # a non-finite loss contributes no gradient; the window's step is skipped on the device
                self.precision.backward(torch.where(finite, loss, torch.zeros_like(loss)) / accum)
                window.add(loss.detach(), finite)
            meter.update(task.batch_size(batch) * self.dist.world_size, steps=0)
            if not last_micro:
                continue

            grad_norm, skipped = self.precision.step(self.optimizer, unwrap(model).parameters(), cfg.clip_grad, ~window.finite)
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.batch_in_epoch = i + 1
            task.on_step_end(unwrap(model), self)
            meter.update(0, steps=1)
            pending.append(self.step, window.mean_loss(), skipped, grad_norm, metrics)
            log_due = self.step % cfg.log_every == 0 or self.step == self.total_steps
            ckpt_due = bool(cfg.ckpt_every_steps) and self.step % cfg.ckpt_every_steps == 0 and self.batch_in_epoch < end_batch
            stop_due = cfg.stop_at_step is not None and self.step >= cfg.stop_at_step and self.step < self.total_steps
            if log_due or ckpt_due or stop_due or self.batch_in_epoch >= end_batch:
                for step, loss_value, bad in pending.read():  # the one host read of these steps' values
                    if bad:
                        self._on_nonfinite(loss_value, step)
                    else:
                        epoch_loss_sum += loss_value
                        epoch_loss_n += 1
                if log_due:
                    self._log_step(pending.last, lr, meter)
                pending.clear()
            if ckpt_due:
                self.save()
            if self.batch_in_epoch < end_batch:  # at the epoch's end, fit() checks after the epoch-end checkpoint
                self._stop_if_signalled()
            if stop_due:
                if self.last_checkpoint is None or self.last_checkpoint.name != f"step-{self.step:08d}.pt":
                    self.save()
                log.info("stopping at step %d (trainer.stop_at_step); continue with resume=auto", self.step)
                return {}

        return self._end_epoch(epoch_loss_sum / epoch_loss_n if epoch_loss_n else float("nan"))

    def _end_epoch(self, mean_loss: float) -> Dict[str, float]:
        """Checkpoint the finished epoch first, then evaluate: an evaluation failure (an unreadable
        validation image, a bug in a metric) must not lose the epoch's training. When the evaluation
        produced metrics, the checkpoint is rewritten so it holds the task's post-evaluation state
        (e.g. the best accuracy so far) and RNG, exactly as an uninterrupted run continues."""
        summary = {"loss": all_reduce_mean(mean_loss), "epoch": self.epoch + 1}
        finished = self._should_stop() or self.epoch + 1 >= self.epochs
        due = finished or (self.epoch + 1) % max(1, self.cfg.ckpt_every_epochs) == 0
        if due:
            self.save(epoch_completed=self.epoch + 1)
        unwrapped = unwrap(self.model)
        unwrapped.eval()
        with torch.no_grad():
            metrics = self.task.evaluate(unwrapped, self)
        summary.update(metrics)
        self.task.on_epoch_end(unwrapped, self)
        unwrapped.train()
        self.writer.add_scalars(self.step, {k: v for k, v in summary.items() if k != "epoch"}, prefix="epoch")
        log.info("epoch %d/%d done: %s", self.epoch + 1, self.epochs, " ".join(f"{k} {v:.4g}" for k, v in summary.items() if k != "epoch"))
        self.epoch += 1
        self.batch_in_epoch = 0
        if due and metrics:
            self.save(epoch_completed=self.epoch)
        return summary

    def _log_step(self, last: Dict[str, Any], lr: float, meter: Throughput) -> None:
        """Log the step just read back from the device (``last``: loss, grad norm, task metrics)."""
        loss = all_reduce_mean(last["loss"])
        speed = meter.read(self.total_steps - self.step)
        scalars = {"loss": loss, "lr": lr, "img_per_s": speed["img_per_s"], **last["metrics"]}
        if last["grad_norm"] is not None:
            scalars["grad_norm"] = last["grad_norm"]
        mem = peak_memory_gb(self.device)
        scalars["peak_mem_gb"] = mem
        self.writer.add_scalars(self.step, {**scalars, "epoch": self.epoch})
        log.info(
            "epoch %d/%d step %d/%d | loss %.4f | lr %.3g | %.1f img/s | mem %.2f GB | eta %s",
            self.epoch + 1, self.epochs, self.step, self.total_steps, loss, lr, speed["img_per_s"], mem,
            format_eta(speed["eta_s"]),
        )

    def _on_nonfinite(self, value: float, step: int) -> None:
        """A step whose loss (or gradient norm) was non-finite: its update was already skipped on the
        device; ``trainer.nonfinite=stop`` raises here, ``skip`` counts it."""
        where = f"epoch {self.epoch + 1}, step {step}"
        if self.cfg.nonfinite == "stop":
            kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"non-finite loss ({value}) at {where}; {kept}. Lower optim.blr, set trainer.clip_grad, "
                "use trainer.precision=bf16 or fp32, or trainer.nonfinite=skip to skip such steps"
            )
        self.skipped_steps += 1
        log.warning("non-finite loss (%s) at %s: step skipped (%d so far)", value, where, self.skipped_steps)


class _Window:
    """The accumulation window's losses on the device: their sum and count over finite micro-batches,
    and whether all of them were finite."""

    def __init__(self, device: torch.device):
        zero = torch.zeros((), device=device)
        self.total, self.count = zero.clone(), zero.clone()
        self.finite = torch.ones((), dtype=torch.bool, device=device)

    def add(self, loss: torch.Tensor, finite: torch.Tensor) -> None:
        self.total = self.total + torch.where(finite, loss.float(), 0.0)
        self.count = self.count + finite.float()
        self.finite = self.finite & finite

    def mean_loss(self) -> torch.Tensor:
        """Mean finite loss of the window; NaN if none was finite (as the skipped step is logged)."""
        return torch.where(self.finite, self.total / self.count.clamp(min=1), float("nan"))


class _DeviceLog:
    """Per-step device values (loss, skipped flag, grad norm, task metrics) awaiting one host read."""

    def __init__(self):
        self.rows: List[Tuple[int, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Dict[str, Any]]] = []
        self.last: Dict[str, Any] = {}

    def append(self, step, loss, skipped, grad_norm, metrics) -> None:
        self.rows.append((step, loss, skipped, grad_norm, dict(metrics)))

    def read(self) -> List[Tuple[int, float, bool]]:
        """``(step, loss, skipped)`` of every pending step, read back with one device sync; keeps the
        last step's loss, grad norm and metrics (as floats) in :attr:`last`."""
        if not self.rows:
            return []
        values = torch.stack([torch.stack([loss.float(), skipped.float()]) for _, loss, skipped, _, _ in self.rows])
        values = values.tolist()
        step, _, _, grad_norm, metrics = self.rows[-1]
        self.last = {
            "loss": values[-1][0],
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "metrics": {k: float(v) for k, v in metrics.items()},
        }
        return [(row[0], loss, bool(bad)) for row, (loss, bad) in zip(self.rows, values)]

    def clear(self) -> None:
        self.rows = []
