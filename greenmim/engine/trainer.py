"""The training loop shared by pretraining, fine-tuning and detection.

A :class:`Trainer` runs a :class:`~greenmim.engine.task.TrainTask`; the task says *what* to train
(model, data, the loss of one batch), the trainer says *how* (devices, DDP, precision,
accumulation, lr schedule, checkpoints, resume, logging). Minimal use::

    class MyTask(TrainTask):
        def build_model(self):                      return MyModel()
        def build_train_loader(self, dist, seed):   return DataLoader(ds, batch_size=32, sampler=...)
        def training_step(self, model, batch, trainer):
            images, _ = batch
            loss, _, _ = model(images.to(trainer.device, non_blocking=True))
            return loss, {}

    Trainer(MyTask(), TrainerConfig.from_yaml(output_dir="runs/x", epochs=10),
            OptimConfig.from_yaml(blr=1.5e-4), {"name": "cosine", "warmup_epochs": 1}).fit()

The configs come complete (the CLIs build them from the composed, validated config; nothing here
restates a default or re-checks a range).

**The step** is :meth:`Trainer.train_step`, one per accumulation window, read top to bottom:

1. the step's lr from the schedule;
2. :class:`~greenmim.engine.step.TrainingStep` (the one device step, which the benchmark runs too):
   per micro-batch the task's ``training_step`` under autocast, the loss's finiteness all-reduced
   on the device, backward (``no_sync`` under DDP except on the last micro-batch); then
   unscale/clip/step, skipped *on the device* when non-finite, and zero grads;
3. the after-step: ``step += 1``, ``task.on_step_end`` (EMA), the step's values queued on the device;
4. only when a log line, checkpoint, ``stop_at_step`` or the epoch's end is due, the one host read
   of the queued values, then the log line and the checkpoint (:meth:`Trainer._after_step`); a
   stop signal is checked there.

Everything else builds around it: :meth:`Trainer.fit` holds the run folder and loops over epochs;
:meth:`Trainer.setup` builds model, loader, optimizer, schedule and the step; :meth:`Trainer.load`
/ :meth:`Trainer.save` resume and checkpoint; ``_end_epoch`` checkpoints first, then evaluates,
runs ``task.on_epoch_end`` and logs the epoch's skipped and converted images (:mod:`.image_counts`).

Conventions:

* A *step* is one optimizer update (``accum_steps`` micro-batches). ``max_steps``, warmup,
  checkpoint intervals and TensorBoard's x axis count steps.
* ``lr = optim.lr`` if set, else ``optim.blr * effective_batch / 256`` with
  ``effective_batch = batch_size * accum_steps * world_size``.
* Resume has one mechanism: the loader's sampler skips the consumed samples itself
  (:meth:`~greenmim.engine.sampler.ResumableDistributedSampler.set_start`). A mid-epoch resume with a
  sampler lacking ``set_start`` is refused with an error naming the fix (no replay of the epoch).
* Only rank 0 writes; every rank calls every hook (they may contain collectives).
* Nothing is lost: the run folder has one owner, a :class:`~greenmim.engine.rundir.RunFolder`
  (created, checked writable and locked by rank 0 before anything is written): the CLI's, handed to
  the trainer, or, when none is given, the one :meth:`fit` holds itself until it returns. Under it
  ``resume`` is resolved and a folder holding another run refused; an epoch's checkpoint is written
  once, before its evaluation (what the evaluation changes goes to a small sidecar); a run ending
  inside an epoch records its true position, so a resume with a larger ``max_steps`` goes on from
  there; a stop signal (SIGTERM, SIGINT, SIGUSR1) during :meth:`Trainer.fit` ends it after the
  current step with a checkpoint and :class:`~greenmim.engine.errors.Preempted` (see
  :mod:`greenmim.engine.signals`).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import signal
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as tdist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import (
    CHECKPOINT_DIR,
    FORMAT,
    VERSION,
    CheckpointManager,
    check_one_run,
    checkpoint_step,
    load_after_eval,
    load_checkpoint,
    resolve_resume,
    scan_latest,
    set_aside,
    write_error,
)
from .config import OptimConfig, TrainerConfig, stored_config
from .distributed import (
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
from .image_counts import CountReport
from .monitor import MetricsWriter, Throughput, format_eta, peak_memory_gb, setup_logging
from .optim import build_optimizer, scaled_lr
from .precision import Precision
from .rundir import RunFolder, remove_orphan_temps, run_folder
from .schedule import LRSchedule, apply_lr, build_schedule, warmup_steps
from .signals import StopSignals, with_ignored_stop_signals
from .step import StepOutput, TrainingStep, compile_mode, unwrap
from .task import TrainTask
from .threads import leave_cores_for_loader_workers
from .workers import shutdown_loader_workers

__all__ = ["Trainer", "TrainTask", "TrainerConfig", "OptimConfig", "unwrap", "enable_grad_checkpointing"]

log = logging.getLogger("greenmim")
_END = object()


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

    Args:
        task, cfg, optim, sched: what to train and how (complete configs: ``sched`` is a ``sched``
            config dict, see :func:`~greenmim.engine.schedule.build_schedule`).
        folder: the run folder its owner holds (the CLI's :func:`~greenmim.engine.rundir.run_folder`);
            None: :meth:`fit` holds ``cfg.output_dir`` itself.

    After :meth:`setup` (called by :meth:`fit`): ``dist``, ``device``, ``output_dir``, ``folder``,
    ``model`` (the training model, DDP-wrapped and/or compiled), ``module`` (the model itself),
    ``step_fn`` (its :class:`~greenmim.engine.step.TrainingStep`), ``optimizer``, ``schedule``,
    ``precision``, ``loader`` (the task's DataLoader), ``batches`` (what the loop iterates: the loader, or its
    batches moved to the device ahead, :meth:`TrainTask.device_batches`), ``writer``, ``peak_lr``, ``effective_batch``, ``steps_per_epoch``, ``total_steps``;
    during training: ``epoch`` (0-based), ``step`` (optimizer steps done), ``batch_in_epoch``
    (micro-batches of this epoch consumed, a multiple of ``accum_steps``), :attr:`is_last_epoch`.
    """

    def __init__(self, task: TrainTask, cfg: TrainerConfig, optim: OptimConfig, sched: Dict[str, Any],
                 folder: Optional[RunFolder] = None):
        self.task = task
        self.cfg = cfg
        self.optim_cfg = optim
        self.sched_cfg = dict(sched)
        self.folder = folder  # the held run folder (the CLI's); None: fit() holds one itself
        self.epoch = 0
        self.step = 0
        self.batch_in_epoch = 0
        self.skipped_steps = 0
        self.last_checkpoint: Optional[Path] = None
        self.signals: Optional[StopSignals] = None  # installed while fit() runs
        self.history: List[Dict[str, float]] = []  # per-epoch summaries

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Build everything :meth:`fit` needs, in the run folder that :meth:`fit` holds. The order
        matters: nothing is written before ``resume`` is resolved and the folder checked to hold no
        other run, and the model is built under the same seed on every rank."""
        self._prepare_output_dir()
        self.precision = Precision(self.cfg.precision, self.device)
        self.image_counts = CountReport()  # skipped and converted images, one total per epoch
        log.info("building the model...")
        model = self._build_model()
        log.info("building the data loader...")
        self._build_loader()
        self._build_optimizer(model)
        self.step_fn = TrainingStep(self._wrap_ddp(model), self.optimizer, self.precision, self.cfg.clip_grad,
                                    self.cfg.accum_steps, self._compile_mode(), self.task.batch_size)
        self.model, self.module = self.step_fn.model, model
        self.writer = MetricsWriter(self.output_dir, enabled=self.dist.is_main, tensorboard=self.cfg.tensorboard)
        self.checkpoints = CheckpointManager(self.output_dir, self.cfg.keep_last, self.cfg.keep_every_epochs)
        if self._resume_path:
            self.load(self._resume_path)
        elif self.cfg.resume and str(self.cfg.resume) == "auto":
            log.info("resume=auto: no checkpoint in %s, starting from scratch", self.output_dir)
        self._write_config()
        self._log_setup()

    def _prepare_output_dir(self) -> None:
        """``resume`` resolved on rank 0 (which holds the folder's lock) and shared, errors included,
        so that no rank waits for a failed one; then logging into the folder."""
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

    def _resolve_output_dir(self) -> Tuple[Optional[Path], List[Tuple[Path, str]]]:
        """Rank 0, holding the folder's lock, before anything is written: resolve ``resume``, refuse to
        mix runs, then remove the temporary files of a checkpoint write that was killed. Returns
        ``(checkpoint to resume, [(newer unreadable checkpoint, why)])``."""
        cfg = self.cfg
        unreadable: List[Tuple[Path, str]] = []
        if str(cfg.resume) == "auto":
            resume, unreadable = scan_latest(self.output_dir)
        else:
            resume = resolve_resume(cfg.resume, self.output_dir)
        check_one_run(self.output_dir, cfg.resume, resume, ignore=[p for p, _ in unreadable])
        for orphan in remove_orphan_temps(self.output_dir / CHECKPOINT_DIR):
            log.info("removed %s, left by a checkpoint write that was interrupted", orphan)
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

    def _build_model(self) -> nn.Module:
        """The task's model on the device: the same initial weights whatever the world size, then
        per-rank RNG streams (dropout, masks, ...)."""
        seed_everything(self.cfg.seed)
        model = self.task.build_model()
        seed_everything(self.cfg.seed, self.dist.rank)
        enable_grad_checkpointing(model, self.cfg.grad_checkpointing)
        return model.to(self.device)

    def _build_loader(self) -> None:
        """The task's loader (workers ignore stop signals), the CPU thread policy, and the run's
        length: ``effective_batch``, ``steps_per_epoch``, ``total_steps``, ``epochs``."""
        cfg = self.cfg
        self.loader = self.task.build_train_loader(self.dist, cfg.seed)
        self.batches = self.task.device_batches(self.loader, self.device)  # what the loop iterates
        self.loader.worker_init_fn = with_ignored_stop_signals(self.loader.worker_init_fn)
        if self.device.type == "cpu":
            leave_cores_for_loader_workers(self.loader.num_workers, self.dist.world_size)
        self.effective_batch = (self.loader.batch_size or 1) * cfg.accum_steps * self.dist.world_size
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

    def _build_optimizer(self, model: nn.Module) -> None:
        """``peak_lr`` (``optim.lr``, or ``optim.blr`` scaled by the effective batch), the optimizer
        over the task's parameter groups, and the lr schedule over ``total_steps``."""
        o = self.optim_cfg
        self.peak_lr = float(o.lr) if o.lr is not None else scaled_lr(o.blr, self.effective_batch, o.base_batch)
        groups = self.task.param_groups(model, o.weight_decay)
        self.optimizer = build_optimizer(model, self.peak_lr, o.weight_decay, o.betas, o.eps, o.name, groups)
        self.schedule: LRSchedule = build_schedule(self.sched_cfg, self.total_steps, self.steps_per_epoch)
        self._warn_if_all_warmup()

    def _warn_if_all_warmup(self) -> None:
        """A run no longer than its lr warmup (e.g. a 4-epoch fine-tune with 5 warmup epochs) only ever
        raises the lr: warn, naming the keys. The run keeps the configured warmup (capped so that the
        last step reaches the peak lr, :func:`build_schedule`); a silent shorter warmup would make the
        run differ from its ``config.yaml``."""
        warmup = warmup_steps(self.sched_cfg, self.steps_per_epoch)
        if warmup <= 0 or warmup < self.total_steps:
            return
        steps = self.sched_cfg.get("warmup_steps")
        given = f"sched.warmup_steps={steps}" if steps is not None and steps >= 0 else f"sched.warmup_epochs={self.sched_cfg.get('warmup_epochs')}"
        length = f"trainer.epochs={self.cfg.epochs}" + (f", trainer.max_steps={self.cfg.max_steps}" if self.cfg.max_steps and self.cfg.max_steps > 0 else "")
        log.warning("the lr warmup (%s: %d steps) is as long as the whole run (%d steps: %s): the lr only rises, reaching its "
                    "peak at the last step, and never decays; set a shorter warmup or train longer", given, warmup, self.total_steps, length)

    def _wrap_ddp(self, model: nn.Module) -> nn.Module:
        if not self.dist.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=self.cfg.find_unused_parameters)

    def _compile_mode(self) -> Optional[str]:
        """``trainer.compile``: the mode the model's forward and backward are compiled with, once
        (see :mod:`.step`), or None for eager."""
        if not self.cfg.compile:
            return None
        mode = compile_mode(self.cfg.compile_mode, self.device, self.dist.distributed, self.cfg.accum_steps)
        log.info("trainer.compile: torch.compile(mode=%s, dynamic=False); the first steps compile", mode)
        return mode

    def _log_setup(self) -> None:
        cfg, n_params = self.cfg, sum(p.numel() for p in unwrap(self.model).parameters())
        log.info(
            "device %s x%d | precision %s | params %.2fM | micro-batch %d x accum %d x world %d = %d | lr %.3g | "
            "%d steps (%d/epoch, %d epochs) | output %s | a progress line every %d steps (trainer.log_every)",
            self.device, self.dist.world_size, cfg.precision, n_params / 1e6, self.loader.batch_size or 1, cfg.accum_steps,
            self.dist.world_size, self.effective_batch, self.peak_lr, self.total_steps, self.steps_per_epoch,
            self.epochs, self.output_dir, cfg.log_every,
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """The full training state, in the format :mod:`greenmim.engine.checkpoint` documents;
        collective (every rank must call it: per-rank RNG and task state are gathered)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.precision.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "skipped_steps": self.skipped_steps,
            "world_size": self.dist.world_size,
            "rank_states": self._rank_states(),
            "task_shared": self.task.shared_state_dict(),
            "config": self.cfg.config,
            "micro_batch": self.loader.batch_size or 1,
            "accum_steps": self.cfg.accum_steps,
            "lr_schedule": self.schedule.record(),
        }

    def _rank_states(self) -> List[Any]:
        """Every rank's RNG and task state, gathered (collective)."""
        rank_state = {"rng": get_rng_state(), "task": self.task.state_dict()}
        if not is_dist():
            return [rank_state]
        gathered: List[Any] = [None] * self.dist.world_size
        tdist.all_gather_object(gathered, rank_state)
        return gathered

    def save(self, epoch_completed: Optional[int] = None) -> None:
        """Write a checkpoint of the current state (rank 0; collective). ``epoch_completed`` (1-based):
        the checkpoint ends that epoch, so it records the start of the next one as its position."""
        state = self.state_dict()
        if epoch_completed is not None:
            state["epoch"], state["batch_in_epoch"] = int(epoch_completed), 0
        path = self._write_on_main(lambda: self.checkpoints.save(state, self.step, epoch_completed))
        log.info("saved checkpoint %s", path)
        self.last_checkpoint = path

    def _save_after_eval(self, metrics: Dict[str, float]) -> None:
        """The post-evaluation sidecar of the checkpoint just written (collective; see the format notes)."""
        state = {"step": self.step, "rank_states": self._rank_states(), "metrics": dict(metrics)}
        self._write_on_main(lambda: self.checkpoints.save_after_eval(state, self.step))

    def _write_on_main(self, write) -> Path:
        """``write()`` on rank 0, its path (or its :class:`UserError`, e.g. a full disk) shared with every rank."""
        error, path = None, None
        if self.dist.is_main:
            try:
                path = str(write())
            except UserError as exc:  # every rank stops with the same message
                error = str(exc)
        error, path = broadcast_object((error, path))  # every rank knows the last checkpoint (same decisions)
        if error:
            raise UserError(error)
        return Path(path)

    def _save_unless_saved(self) -> None:
        """Checkpoint the current step unless the last checkpoint already holds it."""
        if self.last_checkpoint is None or checkpoint_step(self.last_checkpoint) != self.step:
            self.save()

    def load(self, path: Union[str, Path]) -> None:
        """Restore everything :meth:`state_dict` saved (model, optimizer, scaler, position, RNG);
        older checkpoint formats are upgraded by :func:`~greenmim.engine.checkpoint.load_checkpoint`."""
        ckpt = load_checkpoint(path, map_location="cpu")
        self._check_resumable(path, ckpt)
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
        self.precision.load_state_dict(ckpt["scaler"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.batch_in_epoch, self.skipped_steps = int(ckpt["batch_in_epoch"]), int(ckpt["skipped_steps"])
        self.task.load_shared_state_dict(ckpt["task_shared"])
        self._resume_schedule(ckpt["lr_schedule"])
        after_eval = load_after_eval(path)
        states = after_eval["rank_states"] if after_eval else ckpt["rank_states"]
        if ckpt["world_size"] == len(states) == self.dist.world_size:
            set_rng_state(states[self.dist.rank]["rng"])
            self.task.load_state_dict(states[self.dist.rank]["task"])
        else:
            log.warning(
                "checkpoint holds the state of %d process(es) (written by %d), this run has %d: RNG streams are "
                "re-seeded, so the run continues correctly but not bit-identically",
                len(states), ckpt["world_size"], self.dist.world_size,
            )
            seed_everything(self.cfg.seed + 1000 * self.step, self.dist.rank)
        self.last_checkpoint = Path(path)
        log.info("resumed from %s (epoch %d, step %d, batch %d of the epoch)", path, self.epoch, self.step, self.batch_in_epoch)

    def _check_resumable(self, path: Union[str, Path], ckpt: Dict[str, Any]) -> None:
        """Refuse, before anything is restored, a checkpoint of another task, or one whose batches
        differ from this run's: its position in the epoch, its step count and the lr schedule all
        count batches of its size, so continuing with another size would skip or repeat samples."""
        theirs, ours = stored_config(ckpt).get("task"), stored_config({"config": self.cfg.config}).get("task")
        if theirs and ours and theirs != ours:
            raise UserError(
                f"resume={path} is a greenmim-{theirs} checkpoint, not a greenmim-{ours} one: resume it with greenmim-{theirs} "
                f"(same output_dir, resume=auto)" + (", or start from its weights with pretrained=" if ours != "pretrain" else "")
            )
        theirs, ours = (stored_config(c, "model").get("method") for c in (ckpt, {"config": self.cfg.config}))
        if theirs and ours and theirs != ours:
            raise UserError(
                f"resume={path} was written with model.method={theirs}, this run has model.method={ours}: the method differs; "
                f"resume with model.method={theirs}, or start a fresh output_dir= (e.g. with pretrained=)"
            )
        micro, accum = ckpt.get("micro_batch"), ckpt.get("accum_steps")
        ours_micro = self.loader.batch_size or 1
        if (micro is not None and int(micro) != ours_micro) or (accum is not None and int(accum) != self.cfg.accum_steps):
            micro, accum = micro or ours_micro, accum or self.cfg.accum_steps
            raise UserError(
                f"resume={path} was written with data.batch_size={micro} x trainer.accum_steps={accum} per process, this run has "
                f"{ours_micro} x {self.cfg.accum_steps}: its epoch position and steps count batches of that size; resume with "
                f"data.batch_size={micro} trainer.accum_steps={accum}, or start a fresh output_dir= (e.g. with pretrained=)"
            )

    def _resume_schedule(self, record: Optional[Dict[str, Any]]) -> None:
        """Rebuild the checkpoint's lr schedule. When this run's length differs (see
        :class:`~greenmim.engine.schedule.LRSchedule`): mid-run, re-time its rest to end at this run's
        ``total_steps``; after the saved schedule ended (an extension), follow the new length's schedule
        through a re-warmup. Either way one warning says what the lr will do."""
        if not record:
            return
        saved = build_schedule(self.sched_cfg, int(record["total_steps"]), self.steps_per_epoch).restore(record)
        if saved.total_steps == self.total_steps:
            self.schedule = saved
            return
        if self.step >= self.total_steps:
            log.warning("the run's length changed on resume (%d steps, was %d): the checkpoint is already at step %d, "
                        "nothing is left to train", self.total_steps, saved.total_steps, self.step)
            return
        what = f"the run's length changed on resume ({self.total_steps} steps, was {saved.total_steps}: trainer.max_steps / trainer.epochs)"
        lr = lambda s: self.peak_lr * self.schedule.factor(s)  # noqa: E731 - the lr of 0-based step s
        first, last = self.step, self.total_steps - 1
        if self.step >= saved.total_steps:  # an extension of a run whose schedule had ended
            self.schedule = build_schedule(self.sched_cfg, self.total_steps, self.steps_per_epoch).rewarmed(self.step)
            ramp_end = first + max(1, self.schedule.rewarm_steps) - 1
            log.warning(
                "%s after its schedule ended: steps %d-%d follow the %d-step schedule (the lr a run of that length has "
                "there), entered through a linear re-warmup over %d step(s): lr %.3g at step %d, %.3g at step %d, "
                "%.3g at step %d", what, first + 1, last + 1, self.total_steps, self.schedule.rewarm_steps,
                lr(first), first + 1, lr(ramp_end), ramp_end + 1, lr(last), last + 1,
            )
            return
        self.schedule = saved.retimed(self.step, self.total_steps)
        log.warning("%s: the lr schedule continues from step %d (lr %.3g at step %d, no jump) and now ends at step %d "
                    "(lr %.3g)", what, self.step, lr(first), first + 1, self.total_steps, lr(last))

    # ------------------------------------------------------------------ training
    def fit(self) -> Dict[str, float]:
        """Join the process group, hold the run folder (the one given, else :func:`run_folder`'s:
        created, checked writable and locked by rank 0 until this returns), set up, train to
        ``total_steps`` (or ``stop_at_step``), return the last epoch's summary."""
        self.dist = init_distributed(self.cfg.device)
        self.device = self.dist.device
        self.output_dir = Path(broadcast_object(str(Path(self.cfg.output_dir).expanduser().resolve())))
        held = contextlib.nullcontext(self.folder) if self.folder else run_folder(self.output_dir, self.dist.is_main)
        with held as self.folder:
            try:
                try:
                    self.setup()
                except UserError:  # refused: the folder's log as it was (a bug keeps its lines, for the report)
                    self.folder.undo_start()
                    raise
                with StopSignals() as self.signals:
                    while self.epoch < self.epochs and not self._should_stop():
                        summary = self.train_one_epoch()
                        if summary:
                            self.history.append(summary)
                        if not self._should_stop():
                            self._stop_if_signalled()
            finally:
                shutdown_loader_workers(getattr(self, "loader", None))  # an error must not leave workers that block the exit
                if hasattr(self, "writer"):
                    self.writer.close()
        log.info("done: %d steps, output in %s", self.step, self.output_dir)
        return self.history[-1] if self.history else {}

    def train_one_epoch(self) -> Dict[str, float]:
        """The rest of the epoch, one :meth:`train_step` per accumulation window. Returns the epoch's
        summary, or ``{}`` when ``trainer.stop_at_step`` ended the run inside it."""
        self.model.train()
        epoch = _EpochLog(apply_lr(self.optimizer, self.peak_lr, self.schedule.factor(self.step)))
        for batches in self._windows():
            if self.train_step(batches, epoch):
                return {}
        return self._end_epoch(epoch.mean_loss())

    def _windows(self) -> Iterator[Iterable[Any]]:
        """The epoch's remaining accumulation windows, each an iterator over its ``accum_steps``
        micro-batches, until the run's end. The sampler starts at ``batch_in_epoch`` itself (the one
        resume mechanism)."""
        accum = self.cfg.accum_steps
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        if self.batch_in_epoch:
            if not hasattr(sampler, "set_start"):
                raise ConfigError(
                    f"cannot resume in the middle of epoch {self.epoch + 1}: the training loader's sampler "
                    f"({type(sampler).__name__}) cannot skip the {self.batch_in_epoch} batch(es) already seen; build the "
                    "task's loader with greenmim.engine.ResumableDistributedSampler"
                )
            sampler.set_start(self.batch_in_epoch * (self.loader.batch_size or 1))
        batches, done = iter(self.batches), self.batch_in_epoch // accum
        for _ in range(done, min(self.steps_per_epoch, done + self.total_steps - self.step)):
            first = next(batches, _END)
            if first is _END:  # a loader shorter than its len(): the epoch ends here
                return
            yield itertools.chain([first], itertools.islice(batches, accum - 1))

    def train_step(self, batches: Iterable[Any], epoch: "_EpochLog") -> bool:
        """One optimizer step, in order; returns True when ``trainer.stop_at_step`` ends the run here.

        1. The step's lr from the schedule, into every param group.
        2. :class:`~greenmim.engine.step.TrainingStep` over the window's micro-batches: the task's
           ``training_step`` under autocast, the loss's finiteness all-reduced on the device,
           backward (``no_sync`` under DDP except on the last micro-batch), then unscale/clip/step,
           skipped *on the device* when non-finite, and zero grads. Nothing is read on the host.
        3. The after-step: ``step += 1``, ``task.on_step_end`` (e.g. the EMA), the step's device
           values queued for the next host read.
        4. Only when a log line, a checkpoint, ``stop_at_step`` or the epoch's end is due: the one
           host read of the queued values, the log line, the checkpoint (:meth:`_after_step`); a
           pending stop signal is checked there too.
        """
        epoch.lr = apply_lr(self.optimizer, self.peak_lr, self.schedule.factor(self.step))
        out = self.step_fn(batches, self.task.training_step, self)
        self.step += 1
        self.batch_in_epoch += self.cfg.accum_steps
        self.task.on_step_end(self.module, self)
        epoch.queue(self.step, out, self.dist.world_size)
        return self._after_step(epoch)

    def _after_step(self, epoch: "_EpochLog") -> bool:
        """Read the queued values back and log if due, checkpoint if due, stop on a pending signal.
        Returns True when ``trainer.stop_at_step`` ends the run here (after a checkpoint)."""
        cfg = self.cfg
        epoch_end = self.batch_in_epoch >= self.steps_per_epoch * cfg.accum_steps
        log_due = self.step % cfg.log_every == 0 or self.step == self.total_steps
        ckpt_due = bool(cfg.ckpt_every_steps) and self.step % cfg.ckpt_every_steps == 0 and not epoch_end
        stop_due = cfg.stop_at_step is not None and cfg.stop_at_step <= self.step < self.total_steps
        read_now = log_due or ckpt_due or stop_due or epoch_end
        if read_now:
            for step, loss, bad in epoch.read():  # the one host read of these steps' values
                if bad:
                    self._on_nonfinite(loss, step)
                else:
                    epoch.add_loss(loss)
            if log_due:
                self._log_step(epoch)
        if ckpt_due:
            self.save()
        # under DDP the signal check is a collective the host waits for: do it where the host reads
        # anyway, and at least every SIGNAL_CHECK_EVERY steps; a single process checks every step
        check_signal = read_now or self.dist.world_size == 1 or self.step % SIGNAL_CHECK_EVERY == 0
        if check_signal and not epoch_end:  # at the epoch's end, fit() checks after the epoch-end checkpoint
            self._stop_if_signalled()
        if stop_due:
            self._save_unless_saved()
            log.info("stopping at step %d (trainer.stop_at_step); continue with resume=auto", self.step)
        return stop_due

    @property
    def is_last_epoch(self) -> bool:
        """Whether the epoch in progress is the run's last (the schedule's end or ``stop_at_step``)."""
        return self.epoch + 1 >= self.epochs or self._should_stop()

    def _should_stop(self) -> bool:
        stop_at = self.cfg.stop_at_step
        return self.step >= self.total_steps or (stop_at is not None and self.step >= stop_at)

    def _stop_if_signalled(self) -> None:
        """After a step or an epoch: if a stop signal reached any rank, checkpoint (all ranks) and raise
        :class:`Preempted`. The flag is all-reduced so that every rank stops at the same step."""
        signum = (self.signals.requested or 0) if self.signals is not None else 0
        if self.dist.world_size > 1:
            signum = all_reduce_max(signum, self.device)
        if not signum:
            return
        self._save_unless_saved()
        name = signal.Signals(signum).name
        message = (f"stopped by {name} at step {self.step}: saved {self.last_checkpoint}; "
                   "continue with the same command and resume=auto")
        log.warning(message)
        raise Preempted(message, signum)

    def _end_epoch(self, mean_loss: float) -> Dict[str, float]:
        """Checkpoint the epoch first (once), then evaluate: an evaluation failure (an unreadable
        validation image, a bug in a metric) must not lose the epoch's training. What evaluation and
        ``on_epoch_end`` change (the task's state, e.g. the best accuracy so far, and the RNG) is then
        written to the checkpoint's small sidecar, so a resume continues exactly as an uninterrupted
        run. An epoch cut short by the end of the run (``max_steps`` inside an epoch) is saved at its
        true position: a resume with a larger ``max_steps`` finishes that epoch first."""
        summary = {"loss": all_reduce_mean(mean_loss), "epoch": self.epoch + 1}
        due = self.is_last_epoch or (self.epoch + 1) % max(1, self.cfg.ckpt_every_epochs) == 0
        complete = self.batch_in_epoch >= self.steps_per_epoch * self.cfg.accum_steps
        if due:
            self.save(epoch_completed=self.epoch + 1 if complete else None)
        unwrapped = unwrap(self.model)
        unwrapped.eval()
        with torch.no_grad():
            metrics = self.task.evaluate(unwrapped, self)
        summary.update(metrics)
        self.task.on_epoch_end(unwrapped, self)
        unwrapped.train()
        self.image_counts.log(f"epoch {self.epoch + 1}")
        self.writer.add_scalars(self.step, {k: v for k, v in summary.items() if k != "epoch"}, prefix="epoch")
        log.info("epoch %d/%d done: %s", self.epoch + 1, self.epochs, " ".join(f"{k} {v:.4g}" for k, v in summary.items() if k != "epoch"))
        if due:
            self._save_after_eval(metrics)
        self.epoch += 1
        self.batch_in_epoch = 0
        return summary

    def _log_step(self, epoch: "_EpochLog") -> None:
        """Log the step just read back from the device (loss, grad norm, task metrics)."""
        last = epoch.last
        loss = all_reduce_mean(last["loss"])
        speed = epoch.meter.read(self.total_steps - self.step)
        scalars = {"loss": loss, "lr": epoch.lr, "img_per_s": speed["img_per_s"], **last["metrics"]}
        if last["grad_norm"] is not None:
            scalars["grad_norm"] = last["grad_norm"]
        mem = peak_memory_gb(self.device)
        scalars["peak_mem_gb"] = mem
        self.writer.add_scalars(self.step, {**scalars, "epoch": self.epoch})
        log.info(
            "epoch %d/%d step %d/%d | loss %.4f | lr %.3g | %.1f img/s | mem %.2f GB | eta %s",
            self.epoch + 1, self.epochs, self.step, self.total_steps, loss, epoch.lr, speed["img_per_s"], mem,
            format_eta(speed["eta_s"]),
        )

    def _on_nonfinite(self, value: float, step: int) -> None:
        """A step whose loss (or gradient norm) was non-finite: its update was already skipped on the
        device; ``trainer.nonfinite=stop`` raises here, ``skip`` counts it."""
        where = f"epoch {self.epoch + 1}, step {step}"
        # the window's loss is NaN when a loss was non-finite; a finite one means the gradient norm was not
        what = f"non-finite loss ({value})" if not math.isfinite(value) else f"non-finite loss gradient (loss {value:.4g})"
        if self.cfg.nonfinite == "stop":
            kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"{what} at {where}; {kept}. Lower optim.blr, set trainer.clip_grad, "
                "use trainer.precision=bf16 or fp32, or trainer.nonfinite=skip to skip such steps"
            )
        self.skipped_steps += 1
        log.warning("%s at %s: step skipped (%d so far)", what, where, self.skipped_steps)


SIGNAL_CHECK_EVERY = 10  # steps between stop-signal checks under DDP (at most; log lines check too)


class _EpochLog:
    """What one epoch accumulates for logging: throughput, the queued device values of the steps not
    read yet, the sum of the finite step losses read so far, and the current step's lr."""

    def __init__(self, lr: float):
        self.lr = lr
        self.meter = Throughput()
        self.pending: List[Tuple[int, StepOutput]] = []
        self.last: Dict[str, Any] = {}
        self.loss_sum, self.loss_n = 0.0, 0

    def queue(self, step: int, out: StepOutput, world_size: int) -> None:
        """Keep step ``step``'s device values for the next :meth:`read`; count its images."""
        self.pending.append((step, out))
        self.meter.images += out.samples * world_size
        self.meter.steps += 1

    def read(self) -> List[Tuple[int, float, bool]]:
        """``(step, loss, skipped)`` of every pending step, read back with one device sync, and the
        queue emptied; keeps the last step's loss, grad norm and metrics (as floats) in :attr:`last`."""
        if not self.pending:
            return []
        rows, self.pending = self.pending, []
        values = torch.stack([torch.stack([out.loss.float(), out.skipped.float()]) for _, out in rows]).tolist()
        last = rows[-1][1]
        self.last = {
            "loss": values[-1][0],
            "grad_norm": None if last.grad_norm is None else float(last.grad_norm),
            "metrics": {k: float(v) for k, v in last.metrics.items()},
        }
        return [(step, loss, bool(bad)) for (step, _), (loss, bad) in zip(rows, values)]

    def add_loss(self, loss: float) -> None:
        self.loss_sum += loss
        self.loss_n += 1

    def mean_loss(self) -> float:
        return self.loss_sum / self.loss_n if self.loss_n else float("nan")
