"""Classification evaluation (top-1, top-5, cross-entropy) with an exact distributed reduction.

Each rank evaluates a disjoint shard of the validation set *without padding*
(:class:`ShardSampler`: indices ``rank, rank + world, ...``), and the per-rank sums of correct
predictions, losses and counts are all-reduced, so the result is exactly that of a single-process
evaluation of the whole set, whatever the world size (a plain ``DistributedSampler`` pads with
repeated samples and biases the mean).
"""
from __future__ import annotations

import contextlib

from typing import Dict, Iterator, Optional

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from ..engine.distributed import is_dist


class ShardSampler(Sampler):
    """Every ``world_size``-th index from ``rank``, in order, without padding."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0):
        self.length, self.num_replicas, self.rank = length, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


def build_eval_loader(dataset: Dataset, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), world_size, rank),
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        persistent_workers=False,
        generator=torch.Generator(),  # worker seeds from a private generator: evaluating leaves the training RNG alone
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device, autocast=None, topk=(1, 5)) -> Dict[str, float]:
    """``{"loss", "acc1", "acc5", "count"}`` over ``loader`` (accuracies in percent), reduced over ranks.

    ``autocast``: a callable returning the precision context (e.g. ``Precision.autocast``).
    """
    was_training = model.training
    model.eval()
    num_classes: Optional[int] = None
    sums = torch.zeros(2 + len(topk), dtype=torch.float64, device=device)  # loss, count, correct@k...
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = model(images)
        logits = logits.float()
        num_classes = logits.shape[1]
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        sums[1] += targets.numel()
        pred = logits.topk(min(max(topk), num_classes), dim=1).indices
        hit = pred.eq(targets[:, None])
        for i, k in enumerate(topk):
            sums[2 + i] += hit[:, :k].any(dim=1).sum().double()
    if is_dist():
        tdist.all_reduce(sums, op=tdist.ReduceOp.SUM)
    model.train(was_training)
    count = max(float(sums[1]), 1.0)
    out = {"loss": float(sums[0]) / count, "count": int(sums[1])}
    for i, k in enumerate(topk):
        out[f"acc{k}"] = 100.0 * float(sums[2 + i]) / count
    return out
