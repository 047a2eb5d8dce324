"""Pretraining as a :class:`~greenmim.engine.TrainTask`, and the pretraining model built (and
checked) from the ``model`` and ``data`` configs.

Used by ``greenmim-pretrain`` (Hydra), ``greenmim-visualize`` and the config checks of
:mod:`greenmim.cli.validate`, and usable from Python with a config composed from ``configs/`` (the
one place of its defaults)::

    from greenmim.engine.config import compose, optim_config, sched_config, to_dict, trainer_config
    from greenmim.tasks.pretrain.task import PretrainTask
    cfg = compose("pretrain", "experiment=quickstart", "output_dir=runs/x")
    Trainer(PretrainTask(to_dict(cfg.model), to_dict(cfg.data)), trainer_config(cfg), optim_config(cfg), sched_config(cfg)).fit()
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ...data import build_pretrain_dataset, build_train_loader, eval_transform, image_hw
from ...plan.collate import MaskCollator, MIMBatch, planner_for
from .loss import pretrain_loss
from ...data.prefetch import maybe_prefetch
from ...engine import ConfigError, DistInfo, TrainTask
from ...plan.masking import unit_grid
from ...models import UnknownModelError, create_pretrain_model, timm_args
from ...models.registry import mask_unit
from ...models.pretrain import MIM_MODEL_KEYS
from .reconstructions import reconstruction_grid, save_png

log = logging.getLogger("greenmim")



def build_pretrain_model(model_cfg: Mapping[str, Any], img_size: Any) -> nn.Module:
    """A :class:`~greenmim.models.MIMPretrainModel` from a ``model`` config node and ``data.img_size``.

    Raises :class:`ConfigError` for an unknown model name or an image size that is not a multiple of
    the mask unit, naming the fix.
    """
    name, method = model_cfg["name"], model_cfg["method"]
    try:
        unit = mask_unit(name, model_cfg["encoder_args"])
        unit_grid(image_hw(img_size), unit)
        kwargs = {k: model_cfg[k] for k in MIM_MODEL_KEYS if k in model_cfg}
        enc_args = timm_args(model_cfg["encoder_args"])
        for key in ("depths", "num_heads"):
            if key in enc_args:
                enc_args[key] = tuple(enc_args[key])
        model = create_pretrain_model(name, method=method, img_size=image_hw(img_size), **kwargs, **enc_args)
    except UnknownModelError as exc:
        raise ConfigError(f"{exc} (choose a config with model=..., e.g. model=greenmim_swin_base_w7; "
                          "`greenmim-pretrain --help` lists them)") from exc
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    check_windows(model.encoder, img_size)
    return model


def check_windows(encoder: nn.Module, img_size: Any) -> None:
    """Every Swin stage grid must be a multiple of its (clamped) window; raise :class:`ConfigError` otherwise."""
    for i, layer in enumerate(getattr(encoder, "layers", [])):
        for block in getattr(layer, "blocks", []):
            res, win = getattr(block, "input_resolution", None), getattr(block, "window_size", None)
            if res is None or win is None:
                continue
            if res[0] % win[0] or res[1] % win[1]:
                raise ConfigError(
                    f"data.img_size={img_size} gives a {res[0]}x{res[1]} grid at stage {i + 1}, not a multiple of the "
                    f"{win[0]}x{win[1]} window: use an image size whose stage grids divide by the window "
                    f"(224 for window 7) or set model.encoder_args.window_size"
                )


class PretrainTask(TrainTask):
    """Masked image modeling: ``loss, _, _ = model(images, plan=batch.plan)``.

    Args:
        model_cfg: a ``model`` config (``name``, ``method``, ``mask_ratio``, decoder keys, ``encoder_args``).
        data_cfg: a ``data`` config (``name``, ``root``, ``img_size``, ``batch_size``, ``num_workers``, ...).
        vis_every_epochs: write ``reconstructions/epoch_XXXX.png`` every this many epochs and at the end (0: never).
        vis_num_images: rows in that grid.
        static_plans: plan static shapes (True: as a compiled step needs, ``trainer.compile=true``;
            None: the device's default, static on CUDA).

    Masks are drawn and planned in the loader workers (:class:`~greenmim.plan.collate.MaskCollator`)
    from each sample's seed, a function of ``(seed, epoch, index)``: nothing to checkpoint, and a
    resumed run sees the same masks.
    """

    def __init__(self, model_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any], vis_every_epochs: int = 1, vis_num_images: int = 8,
                 static_plans: Optional[bool] = None):
        self.model_cfg = dict(model_cfg)
        self.data_cfg = dict(data_cfg)
        self.mask_ratio = float(self.model_cfg["mask_ratio"])
        self.vis_every_epochs = int(vis_every_epochs)
        self.vis_num_images = int(vis_num_images)
        self.static_plans = static_plans
        self.dataset = None
        self.model: Optional[nn.Module] = None
        self._vis_images: Optional[torch.Tensor] = None

    def build_model(self) -> nn.Module:
        self.model = build_pretrain_model(self.model_cfg, self.data_cfg["img_size"])
        return self.model

    def mask_collator(self, device: torch.device) -> MaskCollator:
        """Draws and plans the masks in the loader workers (planner: :func:`planner_for`)."""
        encoder = self.model.encoder
        grid = unit_grid(tuple(encoder.patch_embed.img_size), encoder.unit)
        return MaskCollator(grid, self.mask_ratio, planner_for(self.model, device, self.static_plans), shared=self.model.shared_mask,
                            batch_size=int(self.data_cfg["batch_size"]))

    def build_train_loader(self, dist: DistInfo, seed: int):
        dataset = self.dataset = build_pretrain_dataset(self.data_cfg)
        if dist.is_main:
            log.info("data: %s, %d images of %s px, decoded on the %s", self.data_cfg["name"], len(dataset),
                     image_hw(self.data_cfg["img_size"]), self.data_cfg["decode"])
        return build_train_loader(
            dataset,
            int(self.data_cfg["batch_size"]),
            dist,
            seed,
            num_workers=int(self.data_cfg["num_workers"]),
            collate_fn=self.mask_collator(dist.device),
        )

    def device_batches(self, loader, device: torch.device):
        """The loader's batches copied to the device one step ahead (``data.device_prefetch``; default: on CUDA)."""
        return maybe_prefetch(loader, device, self.data_cfg["device_prefetch"])

    def training_step(self, model: nn.Module, batch: MIMBatch, trainer) -> Tuple[torch.Tensor, Dict[str, float]]:
        return pretrain_loss(model, batch, trainer.device), {}

    def visualization_images(self) -> torch.Tensor:
        """A fixed set of centre-cropped images spread over the dataset."""
        if self._vis_images is None:
            dataset = copy.copy(self.dataset)  # the training files, without the random crop
            dataset.transform = eval_transform(self.data_cfg["img_size"])
            n = min(self.vis_num_images, len(dataset))
            idx = np.linspace(0, len(dataset) - 1, n).round().astype(int) if self.data_cfg["name"] != "synthetic" else range(n)
            self._vis_images = torch.stack([dataset[int(i)] for i in idx])
        return self._vis_images

    def on_epoch_end(self, model: nn.Module, trainer) -> None:
        every = self.vis_every_epochs
        if not trainer.dist.is_main or every <= 0 or not ((trainer.epoch + 1) % every == 0 or trainer.is_last_epoch):
            return
        images = self.visualization_images().to(trainer.device)
        with trainer.precision.autocast():
            picture = reconstruction_grid(model, images, self.mask_ratio)
        path = save_png(picture, trainer.output_dir / "reconstructions" / f"epoch_{trainer.epoch + 1:04d}.png")
        trainer.writer.add_image("reconstructions", torch.from_numpy(picture).permute(2, 0, 1).float() / 255, trainer.step)
        log.info("saved reconstructions %s", path)
