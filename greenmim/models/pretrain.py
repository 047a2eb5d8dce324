"""The masked-image-modeling pretraining model (greenmim) and its all-token baseline (simmim).

``loss, pred, mask = model(images, mask_ratio=0.75)``:

* ``images``: ``(B, 3, H, W)`` normalised images, ``H`` and ``W`` multiples of the mask unit;
* ``mask``: ``(B, num_units)`` bool, True = masked (drawn per sample unless given or ``shared_mask``),
  returned on the images' device;
* ``pred``: ``(B, num_units, unit*unit*3)`` predicted pixels of every unit (in the per-unit
  normalised space when ``norm_pix_loss``), pixel order ``(row, col, channel)`` as in MAE;
* ``loss``: MSE over the masked units only (their prediction gathered, their target alone built).

The two methods share the decoder; they differ only in the encoder: greenmim's sees the visible
units only, simmim's sees every token with a learned mask token in place of hidden patches.

Training passes ``plan=`` instead of a mask: the mask and its grouping planned ahead of the step
in the DataLoader workers (:mod:`greenmim.plan.collate`), so that a step never waits on the
host planning and never reads a device value back (no device-host synchronisation).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ..plan.masking import DEFAULT_MASK_RATIO, check_mask, random_mask, unit_grid
from ..plan.planner import DevicePlan, HostPlan, planned_mask
from .decoder import MIMDecoder
from .registry import create_encoder


# the MIMPretrainModel arguments of a model config (the rest configure the encoder)
MIM_MODEL_KEYS = ("decoder_dim", "decoder_depth", "decoder_heads", "norm_pix_loss", "shared_mask")


def patchify(images: torch.Tensor, unit: int) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, num_units, unit*unit*3)``, pixels in (row, col, channel) order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // unit, unit, w // unit, unit)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // unit) * (w // unit), unit * unit * c)


def unpatchify(units: torch.Tensor, grid) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, num_units, unit*unit*3)`` -> ``(B, 3, H, W)``."""
    b = units.shape[0]
    u = grid.unit
    x = units.reshape(b, grid.height, grid.width, u, u, 3)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 3, grid.height * u, grid.width * u)


def unit_pixels(images: torch.Tensor, units: torch.Tensor, unit: int) -> torch.Tensor:
    """``patchify(images, unit)`` of the units ``units`` ``(B, n)`` only: ``(B, n, unit*unit*3)``,
    gathered from the images without patchifying the others."""
    b, c, h, w = images.shape
    width = w // unit
    x = images.reshape(b, c, h // unit, unit, width, unit).permute(0, 2, 4, 3, 5, 1)  # (B, rows, cols, u, u, C)
    rows = torch.arange(b, device=images.device).unsqueeze(1)
    return x[rows, units // width, units % width].reshape(b, units.shape[1], unit * unit * c)


def unit_stats(target: torch.Tensor, eps: float = 1e-6):
    """Per-unit mean and std used by the norm-pix target: ``(B, num_units, 1)`` each."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return mean, (var + eps) ** 0.5


class MaskedRows(torch.autograd.Function):
    """``MaskedRows.apply(x, order, n)``: rows ``order[:, :n]`` of ``x`` ``(B, N, P)`` -> ``(B, n, P)``,
    where ``order`` ``(B, N)`` is a permutation of each row's units. Its backward is a gather too
    (each unit reads its gradient row, or a zero row for the units not taken), not autograd's atomic
    scatter-add."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, n: int) -> torch.Tensor:
        b, units = order.shape
        # position of every unit in `order`, the units not taken pointing at the zero row n
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(units, device=order.device).expand(b, -1))
        ctx.save_for_backward(rank.clamp_(max=n))
        return torch.gather(x, 1, order[:, :n].unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rank,) = ctx.saved_tensors
        padded = torch.cat([grad, grad.new_zeros(grad.shape[0], 1, grad.shape[2])], dim=1)
        return torch.gather(padded, 1, rank.unsqueeze(-1).expand(-1, -1, grad.shape[-1])), None, None


class MIMPretrainModel(nn.Module):
    """Encoder + light decoder trained to reconstruct the masked units.

    Args:
        encoder: a greenmim (visible-only) or simmim (all-token) encoder from :func:`create_encoder`.
        decoder_dim, decoder_depth, decoder_heads: the decoder's transformer.
        norm_pix_loss: regress per-unit normalised pixels (MAE/GreenMIM default).
        shared_mask: draw one mask per batch instead of one per sample.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder_dim: int = 512,
        decoder_depth: int = 1,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        shared_mask: bool = False,
    ):
        super().__init__()
        self.encoder = encoder
        self.method = "greenmim" if encoder.visible_only else "simmim"
        self.unit = encoder.unit
        self.norm_pix_loss = norm_pix_loss
        self.shared_mask = shared_mask
        if not encoder.visible_only:
            width = encoder.embed_dim if isinstance(encoder.embed_dim, int) else encoder.embed_dim[0]
            self.enc_mask_token = nn.Parameter(torch.zeros(1, 1, width))
            nn.init.normal_(self.enc_mask_token, std=0.02)
        grid = unit_grid(tuple(encoder.patch_embed.img_size), self.unit)
        self.decoder = MIMDecoder(
            encoder.num_features,
            self.unit,
            decoder_dim,
            decoder_depth,
            decoder_heads,
            visible_only=encoder.visible_only,
            grid_size=(grid.height, grid.width),
        )

    def forward(
        self,
        images: torch.Tensor,
        mask_ratio: float = DEFAULT_MASK_RATIO,
        mask: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        plan: Optional["HostPlan | DevicePlan"] = None,
    ):
        """``plan``: the mask's plan (it carries the mask; ``mask_ratio`` and ``mask`` are then
        ignored). Without a plan or a mask one is drawn on the host from ``generator``.

        Under ``torch.compile`` the greenmim model breaks the graph once, where the plan is resolved
        (:meth:`~greenmim.models.geometry.VisibleEncoderMixin.device_plan`, eager); simmim given a
        plan, host or device, not at all (a planned mask was checked where it was planned)."""
        grid = unit_grid(images.shape[-2:], self.unit)
        if plan is not None:
            mask = planned_mask(plan)
            num_visible = plan.vis_idx.shape[1]  # a shape: no device read, no graph break
        else:
            if mask is None:
                # drawn on the host: the visible-only encoder plans its groups there without a device sync
                mask = random_mask(images.shape[0], grid.num_units, mask_ratio, shared=self.shared_mask, generator=generator)
            else:
                mask = check_mask(mask, images.shape[0], grid.num_units)
            num_visible = int((~mask[0]).sum())  # check_mask read the mask already
        if self.encoder.visible_only:
            plan = self.encoder.device_plan(images, mask, plan)
            latent = self.encoder.forward_plan(images, plan)
            vis_idx, mask = plan.vis_idx, plan.mask
        else:
            if isinstance(plan, DevicePlan):  # already on the device (copied ahead by the loader's prefetcher)
                mask = plan.mask
            latent = self.encoder(images, mask, self.enc_mask_token, checked=True)
            vis_idx, mask = None, mask.to(images.device, non_blocking=True)
        pred = self.decoder(latent, mask, grid, vis_idx)
        loss = self.loss(images, pred, mask, grid.num_units - num_visible)
        return loss, pred, mask

    def target(self, images: torch.Tensor, units: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The regression target ``(B, n, unit*unit*3)``: every unit's pixels (``units`` None, n =
        num_units) or those of the units ``units`` ``(B, n)``, normalised per unit when ``norm_pix_loss``."""
        target = patchify(images, self.unit) if units is None else unit_pixels(images, units, self.unit)
        if self.norm_pix_loss:
            mean, std = unit_stats(target)
            target = (target - mean) / std
        return target

    def loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, num_masked: Optional[int] = None) -> torch.Tensor:
        """Mean squared error per unit, averaged over the masked units, computed on those alone: the
        prediction of the ``num_masked`` masked units of each sample (read from ``mask`` when None, a
        host read) is gathered and only their target is built."""
        if num_masked is None:
            num_masked = int(mask[0].sum())
        # a stable sort puts each row's masked units first, in ascending raster order (no device read)
        order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices
        pred = MaskedRows.apply(pred, order, num_masked)
        return (pred.float() - self.target(images, order[:, :num_masked]).float()).pow(2).mean()

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Images for display, all ``(B, 3, H, W)`` in the input's (normalised) space:

        ``masked`` (hidden units zeroed), ``prediction`` (the raw prediction, un-normalised with each
        unit's true mean/std when ``norm_pix_loss``) and ``reconstruction`` (visible units from the
        input, masked units from the prediction).
        """
        grid = unit_grid(images.shape[-2:], self.unit)
        target = patchify(images, self.unit)
        pixels = pred.float()
        if self.norm_pix_loss:
            mean, std = unit_stats(target.float())
            pixels = pixels * std + mean
        m = mask.to(images.device).unsqueeze(-1)
        return {
            "original": images,
            "masked": unpatchify(target * (~m), grid),
            "prediction": unpatchify(pixels, grid),
            "reconstruction": unpatchify(torch.where(m, pixels, target.float()), grid),
        }


def create_pretrain_model(name: str, method: str = "greenmim", **overrides: Any) -> MIMPretrainModel:
    """Build a pretraining model for a timm Swin/Twins name.

    Keyword arguments named ``decoder_dim``, ``decoder_depth``, ``decoder_heads``, ``norm_pix_loss``
    and ``shared_mask`` configure the MIM model; the rest go to :func:`create_encoder`
    (``drop_path_rate`` defaults to 0, as in the GreenMIM/SimMIM pretraining recipes).
    """
    model_kwargs = {k: overrides.pop(k) for k in MIM_MODEL_KEYS if k in overrides}
    overrides.setdefault("drop_path_rate", 0.0)  # MIM pretraining recipes use no stochastic depth (timm's default is 0.1)
    encoder = create_encoder(name, method=method, **overrides)
    return MIMPretrainModel(encoder, **model_kwargs)
