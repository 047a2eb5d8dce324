"""Weighted k-nearest-neighbour classification on frozen features (DINO's protocol).

Features are L2-normalised; each query takes its ``k`` most cosine-similar training samples, and
neighbour ``j`` votes for its class with weight ``exp(sim_j / T)`` (DINO: k = 20, T = 0.07). The
class scores are the summed votes. Ties in similarity are broken by ``torch.topk`` (lowest index).
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F

from ..finetune.evaluate import reported_topk


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores ``(M, num_classes)`` of the ``M`` queries.

    Args:
        train_features: ``(N, C)`` features of the labelled (training) samples, any scale.
        train_labels: ``(N,)`` integer labels in ``[0, num_classes)``.
        query_features: ``(M, C)`` features to classify.
        k: neighbours per query (clipped to ``N``).
        temperature: vote weights are ``exp(cosine / temperature)``.
        chunk_size: queries per similarity block (memory is ``chunk_size x N``).
    """
    if train_features.ndim != 2 or query_features.ndim != 2 or train_features.shape[1] != query_features.shape[1]:
        raise ValueError(f"expected (N, C) and (M, C) features, got {tuple(train_features.shape)} and {tuple(query_features.shape)}")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"expected {train_features.shape[0]} train labels, got shape {tuple(train_labels.shape)}")
    if temperature <= 0 or k < 1:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    train = F.normalize(train_features.float(), dim=1)
    query = F.normalize(query_features.float(), dim=1)
    labels = train_labels.long().to(train.device)
    k = min(int(k), train.shape[0])
    out = torch.empty(query.shape[0], num_classes, dtype=torch.float32, device=train.device)
    for start in range(0, query.shape[0], chunk_size):
        sim = query[start:start + chunk_size] @ train.T                     # (m, N) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)                               # (m, k)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=torch.float32, device=train.device)
        out[start:start + chunk_size] = votes.scatter_add_(1, labels[top_idx], weights)
    return out


def knn_predict(train_features, train_labels, query_features, num_classes: int, k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """``(M,)`` predicted labels (the class with the largest summed vote)."""
    return knn_scores(train_features, train_labels, query_features, num_classes, k, temperature).argmax(dim=1)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """``{"acc1": ..., "acc5": ...}`` in percent. Top-``k`` for ``k > 1`` is reported only with more than
    ``k`` classes (:func:`~greenmim.tasks.finetune.evaluate.reported_topk`: otherwise it is 100% by definition)."""
    out = {}
    labels = labels.to(scores.device)
    for k in reported_topk(scores.shape[1], topk):
        hit = scores.topk(k, dim=1).indices.eq(labels[:, None]).any(dim=1)
        out[f"acc{k}"] = 100.0 * hit.float().mean().item()
    return out
