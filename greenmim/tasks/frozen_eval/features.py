"""Globally pooled features of a frozen encoder over a dataset, gathered in dataset order across ranks.

The encoder is timm's own classifier built with ``num_classes=0``: ``model(images)`` returns the
pre-logits features ``(B, C)`` — for Swin, the final LayerNorm'd tokens averaged over the grid (timm's
``global_pool="avg"``); for Twins the same. Every rank reads a disjoint shard of the dataset
(indices ``rank, rank + world, ...``, no padding: :class:`~greenmim.tasks.finetune.evaluate.ShardSampler`),
and :func:`gather_in_order` reassembles the full ``(N, C)`` matrix, in dataset order, on every rank.
"""
from __future__ import annotations

import contextlib

from typing import Tuple

import torch
import torch.distributed as tdist
import torch.nn as nn
from torch.utils.data import Dataset

from ...engine.distributed import is_dist
from ...engine.progress import progress
from ..finetune.evaluate import build_eval_loader


def gather_in_order(local: torch.Tensor, total: int) -> torch.Tensor:
    """The ``(total, ...)`` tensor whose row ``i`` is row ``i // world`` of rank ``i % world``'s ``local``.

    ``local`` holds this rank's rows for dataset indices ``rank, rank + world, ...`` (the shard
    order of ``ShardSampler``). A no-op in a single process. Collective: every rank must call it.
    """
    if not is_dist():
        if local.shape[0] != total:
            raise ValueError(f"{local.shape[0]} rows for a dataset of {total}")
        return local
    world = tdist.get_world_size()
    per_rank = -(-total // world)
    device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros((per_rank, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    tdist.all_gather(parts, padded)
    out = torch.empty((total, *local.shape[1:]), dtype=local.dtype, device=device)
    for r in range(world):
        n = len(range(r, total, world))
        out[r::world] = parts[r][:n]
    return out.to(local.device)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    autocast=None,
    what: str = "features",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, C) float32, labels (N,) int64)`` of an ``(image, label)`` dataset, on the CPU,
    identical on every rank. ``model`` maps ``(B, 3, H, W)`` to ``(B, C)`` (a timm model with
    ``num_classes=0``) and is run in eval mode; ``autocast`` is an optional precision context factory.
    ``what`` names the phase in the progress display (:func:`~greenmim.engine.progress.progress`)."""
    rank, world = (tdist.get_rank(), tdist.get_world_size()) if is_dist() else (0, 1)
    loader = build_eval_loader(dataset, batch_size, num_workers, rank, world, pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for images, targets in progress(loader, what):
        images = images.to(device, non_blocking=True)
        with autocast() if autocast is not None else contextlib.nullcontext():
            out = model(images)
        if out.ndim != 2:
            raise ValueError(f"the encoder returned features of shape {tuple(out.shape)}; expected (B, C): build it with num_classes=0")
        feats.append(out.float())
        labels.append(torch.as_tensor(targets, device=device).long())
    model.train(was_training)
    n_local = len(loader.sampler)
    dim = feats[0].shape[1] if feats else _feature_dim(model, dataset, device)
    local_f = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    local_y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    assert local_f.shape[0] == n_local
    return gather_in_order(local_f, len(dataset)).cpu(), gather_in_order(local_y, len(dataset)).cpu()


def _feature_dim(model: nn.Module, dataset: Dataset, device: torch.device) -> int:
    """Feature width for a rank whose shard is empty (more ranks than samples)."""
    dim = getattr(model, "num_features", None)
    if dim is None:
        image, _ = dataset[0]
        dim = model(image[None].to(device)).shape[1]
    return int(dim)
