"""Frozen-feature evaluation of pretrained encoders: the standard self-supervised checks.

* :mod:`.features`: a frozen timm classifier body from any ``pretrained=`` (or random init) and its
  globally pooled features of a dataset, gathered in dataset order across ``torchrun`` ranks;
* :mod:`.knn`: DINO's weighted k-NN classifier (cosine similarity, k = 20, votes ``exp(sim / T)``);
* :mod:`.linear_probe`: MAE's linear probe (BatchNorm without affine + linear head) on frozen features;
* :mod:`.run`: the ``greenmim-finetune protocol=knn|linear_probe`` runs (``experiment=knn`` /
  ``experiment=linear_probe``) that write ``metrics.jsonl`` and ``results.json``.

These live apart from :mod:`greenmim.tasks.finetune` because nothing here trains the encoder: the encoder
is loaded exactly as the fine-tuner loads it (same sources, same checks) and then only read.
"""
from .features import extract_features, gather_in_order
from .knn import knn_predict, knn_scores, topk_accuracy
from .linear_probe import LinearProbe, train_linear_probe

__all__ = ["extract_features", "gather_in_order", "knn_predict", "knn_scores", "topk_accuracy", "LinearProbe", "train_linear_probe"]
