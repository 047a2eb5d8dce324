"""The pretraining loss of one batch, as the trainer and the benchmark compute it."""
from __future__ import annotations

import torch

from ...data.transforms import normalize
from ...plan.collate import MIMBatch


def pretrain_loss(model, batch: MIMBatch, device: torch.device) -> torch.Tensor:
    """The pretraining loss of ``batch`` (what :meth:`~greenmim.tasks.pretrain.task.PretrainTask.training_step`
    and the benchmark's step compute): ``model(images, plan=batch.plan)``'s loss, the uint8 images
    normalised on ``device``."""
    images = normalize(batch.images.to(device, non_blocking=True))  # uint8 -> fp32 on the device
    loss, _, _ = model(images, plan=batch.plan)
    return loss
