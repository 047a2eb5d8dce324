"""Classification evaluation (top-1, top-5, cross-entropy) with an exact distributed reduction.

Top-``k`` for ``k > 1`` is reported only with more than ``k`` classes (:func:`reported_topk`): with
fewer it is 100% by definition. The fine-tuner, the k-NN and the linear probe all follow this rule.

Each rank evaluates a disjoint shard of the validation set *without padding*
(:class:`ShardSampler`: indices ``rank, rank + world, ...``), and the per-rank sums of correct
predictions, losses and counts are all-reduced, so the result is exactly that of a single-process
evaluation of the whole set, whatever the world size (a plain ``DistributedSampler`` pads with
repeated samples and biases the mean).
"""
from __future__ import annotations

import contextlib

from typing import Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from ...engine.distributed import is_dist
from ...engine.progress import progress


class ShardSampler(Sampler):
    """Every ``world_size``-th index from ``rank``, in order, without padding."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0):
        self.length, self.num_replicas, self.rank = length, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


def build_eval_loader(dataset: Dataset, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False,
                      worker_init_fn: Optional[Callable[[int], None]] = None) -> DataLoader:
    """This rank's shard of ``dataset`` in order (:class:`ShardSampler`), every sample once."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), world_size, rank),
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        persistent_workers=False,
        worker_init_fn=worker_init_fn,
        generator=torch.Generator(),  # worker seeds from a private generator: evaluating leaves the training RNG alone
    )


def reported_topk(num_classes: int, topk: Sequence[int] = (1, 5)) -> Tuple[int, ...]:
    """The ``k`` of ``topk`` worth reporting for ``num_classes`` classes: 1, and ``k > 1`` only when ``num_classes > k``."""
    return tuple(k for k in topk if k == 1 or num_classes > k)


def describe_accuracy(metrics: Mapping[str, float], prefix: str = "") -> str:
    """``"top-1 91.00%, top-5 99.00%"`` from the ``{prefix}acc{k}`` entries of ``metrics`` (those present)."""
    keys = sorted((int(key[len(prefix) + 3:]), key) for key in metrics
                  if key.startswith(f"{prefix}acc") and key[len(prefix) + 3:].isdigit())
    return ", ".join(f"top-{k} {metrics[key]:.2f}%" for k, key in keys)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device, autocast=None, topk=(1, 5)) -> Dict[str, float]:
    """``{"loss", "acc1"[, "acc5"], "count"}`` over ``loader`` (accuracies in percent), reduced over ranks;
    ``acc{k}`` for ``k > 1`` only with more than ``k`` classes (:func:`reported_topk`).

    ``autocast``: a callable returning the precision context (e.g. ``Precision.autocast``). The number
    of classes is the logits' width (``model.num_classes`` on a rank whose shard is empty).
    """
    was_training = model.training
    model.eval()
    num_classes: Optional[int] = getattr(model, "num_classes", None)
    sums = torch.zeros(2 + len(topk), dtype=torch.float64, device=device)  # loss, count, correct@k...
    for images, targets in progress(loader, "validation"):
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
    shown = reported_topk(num_classes, topk) if num_classes else tuple(topk)
    for i, k in enumerate(topk):
        if k in shown:
            out[f"acc{k}"] = 100.0 * float(sums[2 + i]) / count
    return out
