"""Random masks on the mask-unit grid.

Convention (same as MAE): a mask is a bool tensor ``(B, num_units)`` in raster order over the
unit grid, ``True`` = masked (hidden from the encoder). Every sample of a batch hides the same
number of units, so visible tokens form rectangular ``(B, N_vis, C)`` tensors.

The mask unit is the encoder's total stride (32 px for Swin/Twins with 4 px patches): one unit is
8x8 tokens at stage 1, 4x4 at stage 2, 2x2 at stage 3 and 1x1 at stage 4, so every 2x2 merge and
every kernel=stride convolution sees blocks that are entirely visible or entirely masked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch

IntOrPair = Union[int, Sequence[int]]

#: MAE's and GreenMIM's share of hidden mask units: the library's one default of it (functions and
#: commands that take a ratio without a config, e.g. :func:`greenmim.models.create_pretrain_model`,
#: ``greenmim-bench``); the pretraining config states its own (``model.mask_ratio`` in configs/pretrain.yaml)
DEFAULT_MASK_RATIO = 0.75


def to_pair(value: IntOrPair) -> Tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"expected an int or a (height, width) pair, got {value}")
    return value


@dataclass(frozen=True)
class UnitGrid:
    """The mask-unit grid of an image: ``height x width`` units of ``unit`` pixels each."""

    height: int
    width: int
    unit: int

    @property
    def num_units(self) -> int:
        return self.height * self.width

    @property
    def img_size(self) -> Tuple[int, int]:
        return (self.height * self.unit, self.width * self.unit)


def unit_grid(img_size: IntOrPair, unit: int) -> UnitGrid:
    """The unit grid of an ``img_size`` image; raises a ValueError naming the fix if it does not fit."""
    h, w = to_pair(img_size)
    if h % unit or w % unit or h <= 0 or w <= 0:
        def near(v: int) -> str:
            lo = max(unit, v // unit * unit)
            return f"{lo} or {lo + unit}" if lo != v else str(v)

        raise ValueError(
            f"image size {h}x{w} is not a multiple of the mask unit ({unit} px = the encoder's total stride); "
            f"use e.g. {near(h)} for the height and {near(w)} for the width (data.img_size=...)"
        )
    return UnitGrid(h // unit, w // unit, unit)


def num_visible_units(num_units: int, mask_ratio: float) -> int:
    """Visible units per sample for ``mask_ratio`` (MAE's rounding: ``int(L * (1 - ratio))``, at least 1)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_units * (1.0 - mask_ratio)))


def check_mask_ratio(mask_ratio: Any, img_size: IntOrPair, unit: int, key: str = "model.mask_ratio") -> float:
    """``mask_ratio`` as a float in (0, 1) that masks at least one unit and leaves at least one visible
    in every sample of ``img_size`` images (``unit`` px units); raises :class:`ConfigError` naming ``key``
    (a config key or a command's option). The loss is a mean over masked units: with none masked it would be 0/0."""
    from ..engine.errors import ConfigError

    try:
        ratio = float(mask_ratio)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={mask_ratio!r} is not a number: use a ratio in (0, 1), e.g. {DEFAULT_MASK_RATIO}") from None
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"{key}={mask_ratio!r} is outside (0, 1): use a ratio in (0, 1), e.g. {DEFAULT_MASK_RATIO}")
    try:
        grid = unit_grid(img_size, unit)
    except ValueError as exc:  # an image size that is not a multiple of the unit; the message names the fix
        raise ConfigError(str(exc)) from None
    visible = num_visible_units(grid.num_units, ratio)
    if grid.num_units - visible < 1:
        raise ConfigError(
            f"{key}={ratio:g} masks none of the {grid.num_units} unit(s) of a {to_pair(img_size)} image ({unit} px units): "
            f"raise the mask ratio or the image size so that at least one unit is masked and one visible"
        )
    return ratio


def random_mask(
    batch_size: int,
    num_units: int,
    mask_ratio: float,
    *,
    shared: bool = False,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Draw a random mask ``(B, num_units)`` bool, ``True`` = masked.

    Each sample hides exactly ``num_units - num_visible_units(num_units, mask_ratio)`` units.
    ``shared=True`` draws one mask and repeats it over the batch (the reference GreenMIM's
    behaviour, kept for comparison). Noise is drawn on the generator's device (CPU by default) so a
    seeded generator gives the same masks on any accelerator; the result is moved to ``device``.
    """
    keep = num_visible_units(num_units, mask_ratio)
    rows = 1 if shared else batch_size
    gen_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand(rows, num_units, generator=generator, device=gen_device)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    mask = ranks >= keep
    if shared:
        mask = mask.expand(batch_size, -1)
    return mask.contiguous().to(device) if device is not None else mask.contiguous()


def seeded_masks(seeds: Sequence[int], num_units: int, mask_ratio: float, *, shared: bool = False) -> torch.Tensor:
    """Masks ``(B, num_units)`` bool drawn from per-sample seeds (True = masked): row ``i`` depends on
    ``seeds[i]`` only, so a batch's masks do not depend on worker count, batch composition or
    resumption. ``shared=True`` gives every row the mask of ``seeds[0]``."""
    keep = num_visible_units(num_units, mask_ratio)
    rows = seeds[:1] if shared else seeds
    # a separate stream from the sample's augmentation, which uses the same seed
    noise = np.stack([np.random.default_rng([int(s), 0x6D61736B]).random(num_units) for s in rows])
    ranks = noise.argsort(axis=1, kind="stable").argsort(axis=1, kind="stable")
    mask = torch.from_numpy(ranks >= keep)
    return mask.expand(len(seeds), -1).contiguous() if shared else mask


def check_mask(mask: torch.Tensor, batch_size: int, num_units: int) -> torch.Tensor:
    """Validate a user-given mask and return it as bool; every row must hide the same number of units."""
    if mask.dim() != 2 or mask.shape != (batch_size, num_units):
        raise ValueError(
            f"mask must have shape (batch, num_units) = ({batch_size}, {num_units}), got {tuple(mask.shape)}"
        )
    mask = mask.bool()
    visible = (~mask).sum(dim=1)
    if visible.numel() and (visible.min() != visible.max() or int(visible.min()) == 0):
        raise ValueError(
            "every sample must keep the same, non-zero number of visible units "
            f"(got visible counts {visible.tolist()[:8]}...); draw masks with greenmim.plan.masking.random_mask"
        )
    return mask


def visible_indices(mask: torch.Tensor) -> torch.Tensor:
    """Ascending raster indices of the visible units, ``(B, N_vis)`` long."""
    n_vis = int((~mask[0]).sum()) if mask.shape[0] else 0
    # a stable sort puts the False (visible) entries first, in ascending index order
    return torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices[:, :n_vis]
