"""Pretraining transforms (MAE / GreenMIM): RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip +
ImageNet normalisation. Output: ``(3, H, W)`` float tensors."""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_hw(img_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """``img_size`` (int or ``[height, width]``) as a ``(height, width)`` tuple."""
    if isinstance(img_size, int):
        return (img_size, img_size)
    h, w = (int(v) for v in img_size)
    return (h, w)


def pretrain_transform(
    img_size: Union[int, Sequence[int]],
    scale: Sequence[float] = (0.2, 1.0),
    hflip: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """PIL RGB image -> normalised ``(3, H, W)`` tensor with a random crop and flip."""
    ops = [T.RandomResizedCrop(image_hw(img_size), scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC)]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def eval_transform(
    img_size: Union[int, Sequence[int]], mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> T.Compose:
    """Deterministic resize of the short side + centre crop (for visualisation)."""
    hw = image_hw(img_size)
    return T.Compose([T.Resize(min(hw), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(hw), T.ToTensor(), T.Normalize(mean, std)])


def denormalize(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Normalised ``(..., 3, H, W)`` -> pixels in [0, 1] (clamped)."""
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(3, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(3, 1, 1)
    return (images * s + m).clamp(0, 1)
