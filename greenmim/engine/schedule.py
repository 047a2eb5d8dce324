"""Per-iteration learning-rate schedules.

A schedule maps the optimizer step (0-based, counted in optimizer updates, i.e. after gradient
accumulation) to a multiplier of the peak lr: :meth:`LRSchedule.factor`. :func:`apply_lr` writes
``peak_lr * factor * group["lr_scale"]`` into every param group, so layer-decay groups keep their
ratios. Add a schedule by subclassing :class:`LRSchedule` and registering it in :data:`SCHEDULES`.

Warmup and milestones are given in epochs (fractions allowed) or steps; epochs are converted with
``steps_per_epoch`` so results do not depend on batch size.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Type

import torch

from .errors import ConfigError


@dataclass
class LRSchedule:
    """Base: linear warmup from 0 over ``warmup_steps``, then :meth:`after_warmup`.

    **A changed length on resume** (``trainer.max_steps`` or ``trainer.epochs``) is one of two cases:

    * **mid-run** (the checkpoint's schedule had not ended): the steps already done keep the lr they
      had, and the rest of the schedule is re-timed to end at the new ``total_steps``
      (:meth:`retimed`): from the resume step on, :meth:`progress` goes on from the value it had there
      to 1 at the new end, so the lr continues without a jump; a warmup not finished yet finishes as
      configured. ``resumed_at`` / ``progress_at_resume`` record that point (None: never re-timed).
    * **an extension** (the checkpoint's schedule had ended, e.g. a finished run resumed with a larger
      ``trainer.max_steps`` / ``trainer.epochs``): the added steps follow the schedule a run of the new
      length would have had from the start (what MAE's ``adjust_learning_rate`` and timm's schedulers
      give when ``--epochs`` is raised and the run resumed), reached through a linear re-warmup from
      0 over ``rewarm_steps`` (the configured warmup, capped at the added steps) starting at
      ``rewarm_at`` (:meth:`rewarmed`). Without it the added steps would all run at the ended
      schedule's final lr (0 for a cosine) and train nothing.
    """

    total_steps: int
    warmup_steps: int = 0
    resumed_at: Optional[int] = None
    progress_at_resume: float = 0.0
    rewarm_at: Optional[int] = None
    rewarm_steps: int = 0

    def factor(self, step: int) -> float:
        f = (step + 1) / self.warmup_steps if self.warmup_steps > 0 and step < self.warmup_steps else self.after_warmup(step)
        if self.rewarm_at is not None and self.rewarm_at <= step < self.rewarm_at + self.rewarm_steps:
            f *= (step - self.rewarm_at + 1) / self.rewarm_steps  # the re-warmup of an extension
        return f

    def after_warmup(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def progress(self, step: int) -> float:
        """The share (0..1) of the post-warmup part done before ``step``."""
        start, done = (self.warmup_steps, 0.0) if self.resumed_at is None else (self.resumed_at, self.progress_at_resume)
        if step <= start:
            return done
        return min(1.0, done + (1.0 - done) * (step - start) / max(1, self.total_steps - start))

    def retimed(self, step: int, total_steps: int) -> "LRSchedule":
        """This schedule continued from ``step`` so that it ends at ``total_steps`` (mid-run; see the class notes)."""
        start = max(step, self.warmup_steps)
        return dataclasses.replace(self, total_steps=int(total_steps), resumed_at=start, progress_at_resume=self.progress(start))

    def rewarmed(self, step: int) -> "LRSchedule":
        """This (fresh, full-length) schedule entered at ``step`` through a linear re-warmup over the
        configured warmup, capped at the steps left (an extension; see the class notes)."""
        return dataclasses.replace(self, rewarm_at=int(step), rewarm_steps=max(0, min(self.warmup_steps, self.total_steps - step)))

    def record(self) -> Dict[str, Any]:
        """What a checkpoint stores to rebuild this schedule (``lr_schedule`` in the checkpoint format)."""
        return {"total_steps": self.total_steps, "resumed_at": self.resumed_at, "progress_at_resume": self.progress_at_resume,
                "rewarm_at": self.rewarm_at, "rewarm_steps": self.rewarm_steps}

    def restore(self, record: Dict[str, Any]) -> "LRSchedule":
        """This schedule with the resume state of a :meth:`record` (keys an older checkpoint lacks: never re-timed)."""
        return dataclasses.replace(
            self, resumed_at=record.get("resumed_at"), progress_at_resume=float(record.get("progress_at_resume") or 0.0),
            rewarm_at=record.get("rewarm_at"), rewarm_steps=int(record.get("rewarm_steps") or 0),
        )


@dataclass
class WarmupCosine(LRSchedule):
    """Linear warmup then half-cosine from 1 to ``min_lr_ratio`` at ``total_steps`` (MAE's schedule)."""

    min_lr_ratio: float = 0.0

    def after_warmup(self, step: int) -> float:
        t = self.progress(step)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass
class WarmupStep(LRSchedule):
    """Linear warmup then multiply by ``gamma`` at each milestone step (detection's schedule)."""

    milestones: Sequence[int] = ()
    gamma: float = 0.1

    def after_warmup(self, step: int) -> float:
        return self.gamma ** sum(step >= m for m in self.milestones)


@dataclass
class Constant(LRSchedule):
    """Linear warmup then constant."""

    def after_warmup(self, step: int) -> float:
        return 1.0


SCHEDULES: Dict[str, Type[LRSchedule]] = {"cosine": WarmupCosine, "step": WarmupStep, "constant": Constant}


def warmup_steps(cfg: Dict[str, Any], steps_per_epoch: int) -> int:
    """The warmup a ``sched`` config asks for, in optimizer steps (``warmup_steps`` when >= 0, else
    ``warmup_epochs`` x ``steps_per_epoch``; neither key: none), before :func:`build_schedule` caps it
    at the run's length."""
    steps, epochs = cfg.get("warmup_steps"), cfg.get("warmup_epochs")  # either gives the warmup: both optional
    if steps is not None and steps >= 0:
        return int(steps)
    return int(round(float(epochs) * steps_per_epoch)) if epochs is not None else 0


def build_schedule(cfg: Dict[str, Any], total_steps: int, steps_per_epoch: int) -> LRSchedule:
    """Build a schedule from a ``sched`` config.

    Keys: ``name`` (one of :data:`SCHEDULES`), ``warmup_epochs`` or ``warmup_steps`` (steps win when
    >= 0), ``milestones_epochs`` or ``milestones_steps`` (step), and the schedule's own fields
    (``min_lr_ratio`` for cosine, ``gamma`` for step): a key left out keeps the field's value in its
    dataclass (the YAML under ``configs/sched/`` gives them all). Warmup is capped at ``total_steps``
    (short runs still reach the peak lr).
    """
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in SCHEDULES:
        raise ConfigError(f"sched.name must be one of {', '.join(SCHEDULES)}, got '{name}'")
    cls = SCHEDULES[name]
    warmup = min(warmup_steps(cfg, steps_per_epoch), max(0, total_steps - 1))
    for key in ("warmup_epochs", "warmup_steps"):
        cfg.pop(key, None)
    kwargs: Dict[str, Any] = {"total_steps": total_steps, "warmup_steps": warmup}
    if "milestones" in {f.name for f in dataclasses.fields(cls)}:
        steps, epochs = cfg.pop("milestones_steps", None), cfg.pop("milestones_epochs", None)
        if steps or epochs is not None:
            kwargs["milestones"] = [int(m) for m in steps] if steps else [int(round(e * steps_per_epoch)) for e in epochs]
    own = {f.name for f in dataclasses.fields(cls)} - {f.name for f in dataclasses.fields(LRSchedule)} - {"milestones"}
    unknown = sorted(set(cfg) - own)
    if unknown:
        raise ConfigError(f"unknown sched key(s) for sched.name={name}: {', '.join(unknown)}")
    return cls(**kwargs, **{k: float(v) for k, v in cfg.items()})


def apply_lr(optimizer: torch.optim.Optimizer, peak_lr: float, factor: float) -> float:
    """Set every group's lr to ``peak_lr * factor * lr_scale``; returns the unscaled lr."""
    lr = peak_lr * factor
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return lr
