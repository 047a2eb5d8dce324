"""``greenmim-finetune protocol=knn|linear_probe``: frozen-feature evaluation runs (``experiment=knn`` /
``experiment=linear_probe``).

One run: build timm's classifier for ``model.name`` exactly as the fine-tuner does (so ``pretrained=``
takes a pretraining checkpoint, an exported encoder, a timm or a greenmim classifier checkpoint, or
nothing for random initialisation), drop its head (``reset_classifier(0)``: the model now returns
globally pooled features), freeze it, extract the features of the train and val splits with the
*evaluation* transform (resize + center crop), then

* ``knn``: DINO's weighted k-NN (``knn.k``, ``knn.temperature``) of every val image among the train images;
* ``linear_probe``: MAE's BatchNorm + linear head trained on the train features for ``probe.epochs``
  (``probe.blr`` x ``probe.batch_size`` / 256, SGD momentum, warmup + cosine), val metrics per epoch.

The ``output_dir`` must be new to runs (no checkpoints, ``config.yaml``, ``metrics.jsonl``,
``results.json`` of another run or protocol: refused with one line) and is locked while the run writes.
Writes (rank 0) ``train.log``, ``metrics.jsonl`` (``knn/acc1``...; ``probe/val_acc1`` per epoch)
and ``results.json`` (``metrics``: the final top-1 [top-5 with more than 5 classes]; ``majority_acc1``:
the share of the most frequent val class, i.e. the best constant answer; the load report; timings).
Under torchrun each rank extracts a shard and the features are gathered, so results do not depend
on the world size.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ...engine import MetricsWriter, Precision, init_distributed, setup_logging
from ...engine.image_counts import CountReport
from ...engine.config import PROTOCOLS
from ...engine.distributed import seed_everything
from ...engine.errors import ConfigError
from ...engine.rundir import RunFolder, check_no_other_run, run_folder
from ..finetune.data import build_classification_data
from ..finetune.evaluate import describe_accuracy
from ..finetune.model import create_classifier
from ..finetune.task import model_kwargs
from .features import extract_features
from .knn import knn_scores, topk_accuracy
from .linear_probe import train_linear_probe

log = logging.getLogger("greenmim")

FROZEN_PROTOCOLS = tuple(p for p in PROTOCOLS if p != "finetune")


def build_frozen_encoder(cfg: DictConfig, num_classes: int):
    """``(model, load_report_or_None)``: the classifier of ``cfg.model`` with ``cfg.pretrained`` loaded,
    its head removed (``model(x)`` -> ``(B, C)`` pooled features), in eval mode, gradients off."""
    model, report = create_classifier(
        cfg.model.name, num_classes, drop_path_rate=0.0, pretrained=cfg.pretrained,
        use_ema=bool(cfg.pretrained_use_ema), **model_kwargs(cfg),
    )
    model.reset_classifier(0)
    model.requires_grad_(False)
    model.eval()
    return model, report


def majority_accuracy(val_labels: torch.Tensor) -> float:
    """The best constant prediction's val top-1 (percent): the share of the most frequent val class."""
    return 100.0 * Counter(val_labels.tolist()).most_common(1)[0][1] / max(1, val_labels.numel())


def run_frozen_eval(cfg: DictConfig, folder: Optional[RunFolder] = None) -> Dict[str, Any]:
    """Run ``cfg.protocol`` (``knn`` | ``linear_probe``) in the held run ``folder`` (None: held here);
    returns the ``results.json`` contents (all ranks)."""
    protocol = str(cfg.protocol)
    if protocol not in FROZEN_PROTOCOLS:
        raise ConfigError(f"protocol={protocol} is not a frozen-feature evaluation: use one of {', '.join(FROZEN_PROTOCOLS)}")
    if cfg.eval_only:
        raise ConfigError(f"eval_only=true evaluates a fine-tuned checkpoint; protocol={protocol} already only evaluates: drop eval_only")
    t0 = time.time()
    data = build_classification_data(cfg.data, None, need_train=True, train_augment=False)  # bad data: refused before any write
    dist = init_distributed(str(cfg.trainer.device))
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    with contextlib.nullcontext(folder) if folder else run_folder(output_dir, enabled=dist.is_main) as held:
        held.check(lambda: check_no_other_run(output_dir, f"protocol={protocol}"))
        return _run(cfg, protocol, dist, output_dir, data, t0)


def _run(cfg: DictConfig, protocol: str, dist, output_dir: Path, data, t0: float) -> Dict[str, Any]:
    """:func:`run_frozen_eval` in its checked and locked ``output_dir``, on the listed ``data``, timed from ``t0``."""
    setup_logging(output_dir, dist.rank)
    if dist.is_main:
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    seed_everything(int(cfg.seed))  # random init (pretrained=null) depends on the seed only
    model, report = build_frozen_encoder(cfg, data.num_classes)
    log.info("%s: %s", protocol, report.summary() if report else f"no pretrained weights: random {cfg.model.name}")
    model.to(dist.device)
    precision = Precision(str(cfg.trainer.precision), dist.device)
    d = cfg.data
    batch, workers = int(d.eval_batch_size or d.batch_size), int(d.num_workers)
    images = CountReport()
    train_x, train_y = extract_features(model, data.train, dist.device, batch, workers, precision.autocast,
                                        f"features of {len(data.train)} train images")
    val_x, val_y = extract_features(model, data.val, dist.device, batch, workers, precision.autocast,
                                    f"features of {len(data.val)} val images")
    images.log("features")
    t_feat = time.time() - t0
    log.info("features: train %s, val %s (%.1f s)", tuple(train_x.shape), tuple(val_x.shape), t_feat)

    writer = MetricsWriter(output_dir, enabled=dist.is_main, tensorboard=bool(cfg.trainer.tensorboard))
    try:
        if protocol == "knn":
            k, temp = int(cfg.knn.k), float(cfg.knn.temperature)
            metrics = topk_accuracy(knn_scores(train_x, train_y, val_x, data.num_classes, k, temp), val_y)
            writer.add_scalars(0, metrics, prefix="knn")
            settings = {"k": k, "temperature": temp}
        else:
            p = cfg.probe
            lr = float(p.lr) if p.lr is not None else float(p.blr) * int(p.batch_size) / int(p.base_batch)

            def on_epoch(epoch: int, row: Dict[str, float]) -> None:
                writer.add_scalars(epoch, row, prefix="probe")
                if epoch % max(1, int(p.log_every)) == 0 or epoch == int(p.epochs):
                    log.info("probe epoch %d/%d: train loss %.4f, val top-1 %.2f%%", epoch, int(p.epochs), row["train_loss"], row["val_acc1"])

            _, history = train_linear_probe(
                train_x, train_y, val_x, val_y, data.num_classes, epochs=int(p.epochs), batch_size=int(p.batch_size), lr=lr,
                weight_decay=float(p.weight_decay), momentum=float(p.momentum), warmup_epochs=int(p.warmup_epochs),
                seed=int(cfg.seed), on_epoch=on_epoch,
            )
            metrics = {k[len("val_"):]: v for k, v in history[-1].items() if k.startswith("val_acc")}
            settings = {**OmegaConf.to_container(p, resolve=True), "lr": lr}
    finally:
        writer.close()
    results = {
        "protocol": protocol,
        "metrics": metrics,
        "majority_acc1": majority_accuracy(val_y),
        "settings": settings,
        "num_classes": data.num_classes,
        "train_images": int(train_x.shape[0]),
        "val_images": int(val_x.shape[0]),
        "feature_dim": int(train_x.shape[1]),
        "pretrained": cfg.pretrained,
        "load_report": report.to_dict() if report else None,
        "features_s": t_feat,
        "wall_s": time.time() - t0,
    }
    if dist.is_main:
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        log.info("%s: val %s (majority class %.2f%%); results in %s", protocol,
                 describe_accuracy(metrics), results["majority_acc1"], output_dir / "results.json")
    return results
