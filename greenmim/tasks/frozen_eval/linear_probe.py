"""MAE's linear probe on frozen features: ``BatchNorm1d(C, affine=False)`` + ``Linear(C, K)``.

The encoder never sees this module: the features are computed once (:mod:`.features`, evaluation
transform) and the head is trained on them, so the encoder cannot change and the probe of a small
dataset takes seconds. MAE's recipe otherwise: head weights ~ trunc-normal(std 0.01), bias 0; no
weight decay; per-iteration linear warmup then half-cosine to 0; ``lr = blr x batch / 256`` (blr 0.1).
MAE uses LARS at batch 16384; at the batch sizes of small datasets plain SGD with momentum 0.9 is the
equivalent choice (LARS' trust ratio only matters for huge batches). Differences from MAE, by design:
no RandomResizedCrop/flip on the training features (cached features; on small datasets this is the
usual protocol, e.g. CLIP's logistic-regression probe) and the probe trains on one process — under
torchrun every rank trains the same probe on the same gathered features (it is tiny), rank 0 writes.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .knn import topk_accuracy


class LinearProbe(nn.Module):
    """``(B, C)`` features -> ``(B, num_classes)`` logits through a parameter-free BatchNorm and a linear layer."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then half-cosine from 1 to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def probe_metrics(probe: LinearProbe, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """``{"loss", "acc1"[, "acc5"]}`` of ``probe`` (eval mode) on features ``x`` and labels ``y``."""
    was_training = probe.training
    probe.eval()
    logits = probe(x)
    probe.train(was_training)
    return {"loss": F.cross_entropy(logits, y).item(), **topk_accuracy(logits, y)}


def train_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 64,
    lr: float = 0.025,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    warmup_epochs: int = 10,
    seed: int = 0,
    on_epoch: Optional[Callable[[int, Dict[str, float]], None]] = None,
) -> Tuple[LinearProbe, List[Dict[str, float]]]:
    """Train a :class:`LinearProbe` on ``(N, C)`` features; returns ``(probe, history)``.

    ``history[e]`` holds epoch ``e + 1``'s ``train_loss``, ``val_loss``, ``val_acc1`` (and
    ``val_acc5`` with more than 5 classes) and ``lr``; ``on_epoch(epoch, metrics)`` is called with
    the same dictionary after every epoch. Batches are reshuffled every epoch from a generator seeded
    with ``seed`` and the last incomplete batch is dropped (BatchNorm needs > 1 sample), so the result
    depends only on the features and ``seed``.
    """
    n, dim = train_x.shape
    if n < 2:
        raise ValueError(f"a linear probe needs at least 2 training samples, got {n}")
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    probe = LinearProbe(dim, num_classes).to(train_x.device)
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    history: List[Dict[str, float]] = []
    step = 0
    for epoch in range(epochs):
        probe.train()
        order = torch.randperm(n, generator=gen).to(train_x.device)
        loss_sum = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            cur_lr = lr * lr_factor(step, total, warmup)
            for group in opt.param_groups:
                group["lr"] = cur_lr
            loss = F.cross_entropy(probe(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
            step += 1
        val = probe_metrics(probe, val_x, val_y)
        row = {"train_loss": loss_sum / steps_per_epoch, "lr": cur_lr, **{f"val_{k}": v for k, v in val.items()}}
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch + 1, row)
    return probe, history
