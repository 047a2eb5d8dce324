"""What to train: the :class:`TrainTask` contract between a task (model, data, loss of one batch,
optional hooks) and the :class:`~greenmim.engine.Trainer` that runs it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from .distributed import DistInfo

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import Trainer


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
        trainer calls ``loader.sampler.set_epoch(epoch)`` and, on a mid-epoch resume, ``set_start(n)``,
        so the sampler must have it: use :class:`~greenmim.engine.sampler.ResumableDistributedSampler`).
        Its ``batch_size`` is the per-process micro-batch."""
        raise NotImplementedError

    def device_batches(self, loader: torch.utils.data.DataLoader, device: torch.device) -> Iterable[Any]:
        """What the training loop iterates: ``loader`` itself (the default; :meth:`training_step` moves
        each batch to the device), or an iterable of its batches already on ``device`` (e.g.
        :func:`~greenmim.data.prefetch.maybe_prefetch`). The trainer keeps ``loader`` for its sampler,
        batch size and workers."""
        return loader

    def training_step(self, model: nn.Module, batch: Any, trainer: "Trainer") -> Tuple[torch.Tensor, Dict[str, float]]:
        """Loss of one micro-batch (a scalar tensor, run under autocast) and extra metrics to log
        (numbers or device scalars; keep them on the device, the trainer reads them only when it logs,
        averaged over the step's micro-batches). ``model`` is the (possibly DDP-wrapped) training
        model; move ``batch`` to ``trainer.device``."""
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

