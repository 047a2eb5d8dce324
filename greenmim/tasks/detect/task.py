"""The detection task for the shared training engine (:class:`greenmim.engine.Trainer`).

:class:`DetectionTask` plugs Mask R-CNN into the engine's hooks: ``build_model`` (the detector with
its trunk initialised from a pretrained checkpoint), ``build_train_loader`` (COCO training set,
resumable distributed sampler with per-sample flip seeds), ``training_step`` (the sum of the five
Mask R-CNN losses, each also logged), ``param_groups`` (AdamW groups with optional layer-wise lr
decay over the trunk) and ``evaluate`` (COCO bbox/segm AP on the validation set, sharded over
ranks, gathered on rank 0 and broadcast back). Everything else (DDP, precision, accumulation,
warmup + step schedule, atomic checkpoints, ``resume=auto``, progress, TensorBoard) is the engine's.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from ...engine.distributed import DistInfo, broadcast_object
from ...engine.errors import ConfigError
from ...engine.optim import no_weight_decay_names
from ...engine.progress import progress
from ...engine.sampler import ResumableDistributedSampler, SeededDataset
from ...engine.signals import ignore_stop_signals
from ...engine.trainer import TrainTask, unwrap
from ...weights import layer_id_fn, transfer_kwargs
from .data import CocoDetection, CocoFormatError, collate
from .evaluate import CocoEvaluator
from .model import TRUNK_PREFIX, build_maskrcnn

log = logging.getLogger("greenmim")

#: keys of the ``detector`` config node
DETECTOR_KEYS = ("fpn_channels", "out_norm", "maskrcnn")


def backbone_kwargs(model_cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """timm constructor arguments of the trunk (:func:`~greenmim.weights.transfer_kwargs`) plus
    ``model.drop_path_rate``."""
    args = transfer_kwargs(model_cfg["name"], model_cfg["encoder_args"], "detection")
    args["drop_path_rate"] = float(model_cfg["drop_path_rate"] or 0.0)
    return args


def build_datasets(data: Mapping[str, Any], train: bool = True) -> Tuple[Optional[CocoDetection], CocoDetection]:
    """``(train_set or None, val_set)`` from a ``data`` config (see ``configs/data/coco.yaml``)."""
    common = dict(bad_boxes=data["bad_boxes"], missing_images=data["missing_images"])
    train_set = None
    if train:
        train_set = CocoDetection(
            data["train_images"], data["train_ann"], train=True, flip_prob=float(data["flip_prob"]),
            filter_empty=bool(data["filter_empty"]), max_images=int(data["max_images"]),
            on_corrupt=data["on_corrupt"], **common,
        )
    val_set = CocoDetection(
        data["val_images"], data["val_ann"], train=False, flip_prob=0.0, filter_empty=False,
        max_images=int(data["max_val_images"]), on_corrupt="error", **common,
    )
    val_set.check_images()  # a bad validation image fails now, not after the first epoch
    if train_set is not None and train_set.cat_ids != val_set.cat_ids:
        raise CocoFormatError(
            f"training and validation files define different categories ({train_set.cat_ids[:5]}... vs "
            f"{val_set.cat_ids[:5]}...): use annotation files of the same dataset"
        )
    return train_set, val_set


def detection_param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> List[Dict[str, Any]]:
    """AdamW groups for the detector: weight decay except on 1-D tensors and ``no_weight_decay()``
    names (Swin's relative-position tables); with ``layer_decay < 1`` the trunk's parameters get
    ``lr_scale = layer_decay ** (L + 1 - depth)`` by the fine-tuning rule
    (:mod:`greenmim.weights.layer_decay`) and everything else (output norms, FPN, RPN, RoI heads)
    the full lr."""
    model = unwrap(model)
    trunk = model.backbone.trunk.model
    depth_of = layer_id_fn(trunk) if layer_decay != 1.0 else None
    if layer_decay != 1.0 and depth_of is None:
        raise ConfigError(f"optim.layer_decay is defined for Swin, Twins and PVTv2 trunks, not {type(trunk).__name__}")
    top = (max(depth_of(n) for n, _ in trunk.named_parameters()) + 1) if depth_of else 0
    skip = no_weight_decay_names(model)
    groups: Dict[str, Dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or any(fnmatch.fnmatchcase(name, pat) for pat in skip)
        depth = depth_of(name[len(TRUNK_PREFIX):]) if (depth_of and name.startswith(TRUNK_PREFIX)) else top
        key = f"layer_{depth}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {"name": key, "params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": layer_decay ** (top - depth) if depth_of else 1.0}
        groups[key]["params"].append(param)
    return list(groups.values())


def shard(dataset, dist: DistInfo):
    """Every ``world_size``-th image from ``rank``: disjoint, no padding, each image evaluated once."""
    if dist.world_size == 1:
        return dataset
    return Subset(dataset, list(range(dist.rank, len(dataset), dist.world_size)))


@torch.no_grad()
def evaluate_coco(
    model: nn.Module,
    dataset: CocoDetection,
    device: torch.device,
    dist: DistInfo,
    batch_size: int = 1,
    num_workers: int = 0,
    output_dir: Optional[str] = None,
    prefix: str = "",
) -> Dict[str, float]:
    """COCO bbox/segm AP of ``model`` on ``dataset`` (all ranks call it; every rank gets the metrics).

    Results files ``{prefix}results_bbox.json`` / ``{prefix}results_segm.json`` go to ``output_dir``
    (rank 0; training overwrites ``val_*`` at each evaluation, ``eval_only`` writes ``eval_*``).
    Progress: :func:`~greenmim.engine.progress.progress` (a bar on a terminal, else a line every few seconds).
    """
    model = unwrap(model)
    was_training = model.training
    model.eval()
    loader = DataLoader(shard(dataset, dist), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate, worker_init_fn=ignore_stop_signals,
                        generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
    evaluator = CocoEvaluator(dataset.coco, dataset.label_to_cat)
    for images, targets in progress(loader, f"COCO evaluation of {len(dataset)} images"):
        outputs = model([im.to(device, non_blocking=True) for im in images])
        # threshold the pasted full-image masks on the device: bool moves 4x fewer bytes than float
        outputs = [{k: (v > evaluator.mask_threshold if k == "masks" else v).cpu() for k, v in o.items()} for o in outputs]
        evaluator.update(outputs, [int(t["image_id"]) for t in targets])
    metrics = evaluator.evaluate(output_dir if dist.is_main else None, prefix)
    metrics = broadcast_object(metrics)
    if was_training:
        model.train()
    return metrics


class DetectionTask(TrainTask):
    """Mask R-CNN training on COCO-format data through the engine.

    Args:
        model_cfg: the backbone, as in pretraining: ``name`` (timm ``swin_*`` / ``twins_*``),
            ``encoder_args`` (timm architecture arguments), plus ``drop_path_rate``; other keys of
            the pretraining model options (decoder, mask ratio) are ignored.
        data_cfg: see ``configs/data/coco.yaml`` (paths, ``batch_size``, ``min_size``, ``max_size``, ...).
        detector_cfg: ``fpn_channels``, ``out_norm``, ``maskrcnn`` (extra torchvision ``MaskRCNN`` arguments).
        pretrained: trunk weights (greenmim pretraining checkpoint, exported encoder, timm checkpoint).
        use_ema: take the checkpoint's EMA weights.
        layer_decay: layer-wise lr decay over the trunk (1.0: off).
        eval_every: evaluate every N epochs (and always after the last one); 0: only at the end.
        train: build the training set too (False for ``eval_only``).
    """

    def __init__(self, model_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any],
                 detector_cfg: Mapping[str, Any], *, pretrained: Optional[str], use_ema: bool, layer_decay: float,
                 eval_every: int, train: bool = True):
        self.model_cfg = dict(model_cfg)
        self.data_cfg = dict(data_cfg)
        self.detector_cfg = dict(detector_cfg)
        unknown = sorted(set(self.detector_cfg) - set(DETECTOR_KEYS))
        if unknown:
            raise ConfigError(f"unknown detector key(s) {', '.join(unknown)}: expected {', '.join(DETECTOR_KEYS)}")
        if not self.model_cfg["name"]:
            raise ConfigError("model.name is required (a timm swin_* or twins_* name, e.g. model=greenmim_swin_base_w7)")
        self.pretrained = pretrained or None
        self.use_ema = bool(use_ema)
        self.layer_decay = float(layer_decay)
        self.eval_every = int(eval_every)
        self.train_set, self.val_set = build_datasets(self.data_cfg, train=train)
        self.num_classes = self.val_set.num_classes
        self.last_metrics: Dict[str, float] = {}
        self.load_report = None
        self._first_step_start: Optional[float] = None  # when a fresh run's first step began
        self._first_loss: Optional[torch.Tensor] = None  # its first micro-batch's loss, until logged

    def data_summary(self) -> str:
        """One line: images, annotations, categories and what was skipped, per split."""
        sets = (("train", self.train_set), ("val", self.val_set))
        return "data: " + " | ".join(f"{split} {os.path.basename(ds.ann_file)}: {ds.report.summary()}"
                                     for split, ds in sets if ds is not None)

    # -- engine hooks ---------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        det = self.detector_cfg
        model = build_maskrcnn(
            self.model_cfg["name"],
            self.num_classes,
            pretrained=self.pretrained,
            use_ema=self.use_ema,
            out_norm=det["out_norm"],
            fpn_channels=int(det["fpn_channels"]),
            min_size=self.data_cfg["min_size"],
            max_size=int(self.data_cfg["max_size"]),
            detector_kwargs=dict(det["maskrcnn"] or {}),  # null: none
            **backbone_kwargs(self.model_cfg),
        )
        self.load_report = model.backbone.trunk.load_report
        if self.load_report is not None:
            log.info("pretrained trunk: %s", self.load_report.summary())
        return model

    def build_train_loader(self, dist: DistInfo, seed: int) -> DataLoader:
        if self.train_set is None:
            raise ConfigError("this task was built with train=False (eval_only); no training loader")
        d = self.data_cfg
        if dist.is_main:
            log.info("%s", self.data_summary())
        sampler = ResumableDistributedSampler(len(self.train_set), dist.world_size, dist.rank, shuffle=True,
                                              seed=seed, drop_last=True, seeded=True)
        workers = int(d["num_workers"])
        # the loader's own generator: creating an iterator (every epoch, and after a resume) must not
        # draw from the global torch RNG, which Mask R-CNN's proposal/RoI samplers use (exact resume)
        generator = torch.Generator().manual_seed(seed + dist.rank)
        return DataLoader(SeededDataset(self.train_set), batch_size=int(d["batch_size"]), sampler=sampler,
                          num_workers=workers, collate_fn=collate, drop_last=True, generator=generator,
                          persistent_workers=workers > 0, pin_memory=dist.device.type == "cuda")

    def training_step(self, model: nn.Module, batch: Any, trainer) -> Tuple[torch.Tensor, Dict[str, float]]:
        if trainer.step == 0 and self._first_step_start is None:
            self._first_step_start = time.perf_counter()
        images, targets = batch
        device = trainer.device
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        loss = sum(losses.values())
        if trainer.step == 0 and self._first_loss is None:
            self._first_loss = loss.detach()
        return loss, {k: v.detach() for k, v in losses.items()}  # read back only when the trainer logs

    def batch_size(self, batch: Any) -> int:
        return len(batch[0])

    def on_step_end(self, model: nn.Module, trainer) -> None:
        """A progress line after step 1 (a detection step is slow: the first ``trainer.log_every``
        line may be minutes away); it reads the first loss back, once."""
        if trainer.step != 1 or self._first_loss is None:
            return
        loss, self._first_loss = self._first_loss, None
        next_line = min(trainer.cfg.log_every, trainer.total_steps)
        if trainer.dist.is_main and next_line > 1:  # else the trainer's own line for step 1 is due now
            log.info("step 1/%d | loss %.4f | %.1f s | next progress line at step %d (trainer.log_every)",
                     trainer.total_steps, float(loss), time.perf_counter() - self._first_step_start, next_line)

    def param_groups(self, model: nn.Module, weight_decay: float) -> Optional[List[Dict[str, Any]]]:
        return detection_param_groups(model, weight_decay, self.layer_decay)

    def evaluate(self, model: nn.Module, trainer) -> Dict[str, float]:
        due = self.eval_every > 0 and (trainer.epoch + 1) % self.eval_every == 0
        if not (trainer.is_last_epoch or due):
            return {}
        return self.evaluate_model(model, trainer)

    def coco_metrics(self, model: nn.Module, dist: DistInfo, output_dir, prefix: str) -> Dict[str, float]:
        """COCO AP of ``model`` on the validation set (all ranks); detections in
        ``output_dir/{prefix}results_{bbox,segm}.json`` (:func:`evaluate_coco`)."""
        d = self.data_cfg
        return evaluate_coco(model, self.val_set, dist.device, dist, batch_size=int(d["eval_batch_size"]),
                             num_workers=int(d["num_workers"]), output_dir=str(output_dir), prefix=prefix)

    def evaluate_model(self, model: nn.Module, trainer) -> Dict[str, float]:
        """COCO AP of ``model`` on the validation set now (all ranks); kept in ``last_metrics``."""
        self.last_metrics = self.coco_metrics(model, trainer.dist, trainer.output_dir, "val_")
        if trainer.dist.is_main:
            log.info("COCO val: %s", format_metrics(self.last_metrics))
        return self.last_metrics


def format_metrics(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k} {100 * v:.1f}" if v >= 0 else f"{k} n/a" for k, v in metrics.items())

