"""Pretraining augmentation (MAE / GreenMIM): RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip,
producing **uint8** ``(3, H, W)`` pixels; :func:`normalize` turns a batch into ImageNet-normalised fp32
on whatever device it is on (the training step calls it there).

The crop is split into a *plan* and its application, so that a crop can be applied to a smaller
decode of the same picture:

* :class:`CropPlan` is the random draw (box on the full-size geometry, flip): RandomResizedCrop's
  distribution, drawn by :func:`draw_crop` from python's seeded ``random``.
* :func:`draft_for_crop` asks PIL to decode a JPEG at the smallest DCT scale (1/2, 1/4, 1/8) at which
  the crop box still has at least the output size in both axes.
* :func:`apply_crop` maps the box to the image actually decoded and resizes it with bicubic,
  antialiased interpolation (torch's, which follows PIL's filter; its uint8 CPU path is ~2x faster).

:class:`PretrainCrop` is the ``data.decode=cpu`` transform (decode + crop in the workers);
:mod:`greenmim.data.device_decode` holds the ``data.decode=device`` one.
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from .images import decode_jpeg_rgb, decode_rgb, read_image, to_rgb, torch_decodes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: MAE's pretraining crop: the library's one default of its area range and flip probability (the
#: pretraining config states its own: ``data.crop_scale``, ``data.hflip`` in configs/pretrain.yaml)
DEFAULT_CROP_SCALE = (0.2, 1.0)
DEFAULT_HFLIP = 0.5
DCT_SCALES = (8, 4, 2)  # PIL's draft reductions for JPEGs, largest first


def image_hw(img_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """``img_size`` (int or ``[height, width]``) as a ``(height, width)`` tuple."""
    if isinstance(img_size, int):
        return (img_size, img_size)
    h, w = (int(v) for v in img_size)
    return (h, w)


def normalize(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 pixels ``(..., 3, H, W)`` -> fp32 ``(x / 255 - mean) / std``, on ``images``' device.

    Computed in fp32 whatever autocast is active (elementwise ops are not autocast), so a bf16/fp16
    step casts the normalised values, not the pixels. The constants are made once per device (no
    host-to-device copy per step)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 pixels, got {images.dtype}")
    scale, shift = _affine(images.device, tuple(mean), tuple(std))
    return torch.addcmul(shift, images.float(), scale)


@functools.lru_cache(maxsize=16)
def _affine(device: torch.device, mean: Tuple[float, ...], std: Tuple[float, ...]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(1 / (255 std), -mean / std)`` as fp32 ``(3, 1, 1)`` tensors on ``device``."""
    m, s = torch.tensor(mean, dtype=torch.float64).view(3, 1, 1), torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
    return (1 / (255 * s)).float().to(device), (-m / s).float().to(device)


@dataclass(frozen=True)
class CropPlan:
    """One random crop: the box ``(top, left, height, width)`` in pixels of the full-size image of
    size ``image_hw`` (height, width), and whether to flip the result horizontally."""

    top: int
    left: int
    height: int
    width: int
    image_hw: Tuple[int, int]
    flip: bool


def draw_crop(img: Image.Image, scale: Sequence[float], hflip: float) -> CropPlan:
    """Draw a :class:`CropPlan` for ``img`` (only its size is read: a lazily opened file will do).

    RandomResizedCrop's rule (area fraction uniform in ``scale``, log aspect ratio uniform in
    ``CROP_RATIO``, up to 10 tries, else the central crop at the nearest allowed ratio) drawn from
    python's ``random``: a few microseconds, where torchvision's draw costs ~0.1 ms of torch ops,
    which is most of a ``data.decode=device`` worker's time. Seeded per sample like torch's RNG
    (:class:`~greenmim.engine.sampler.SeededDataset` seeds both)."""
    height, width = img.height, img.width
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        target = height * width * random.uniform(scale[0], scale[1])
        aspect = math.exp(random.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = random.randint(0, height - h), random.randint(0, width - w)
            break
    else:
        w, h = width, height
        if width / height < CROP_RATIO[0]:
            h = round(width / CROP_RATIO[0])
        elif width / height > CROP_RATIO[1]:
            w = round(height * CROP_RATIO[1])
        top, left = (height - h) // 2, (width - w) // 2
    flip = hflip > 0 and random.random() < hflip
    return CropPlan(top, left, h, w, (height, width), flip)


def draft_for_crop(img: Image.Image, plan: CropPlan, out_hw: Tuple[int, int]) -> int:
    """Set a lazily opened JPEG to decode at the largest DCT reduction ``s`` for which the crop box,
    scaled by ``1/s``, still has at least ``out_hw`` pixels (plus one, for rounding the box to whole
    pixels) in both axes; returns ``s`` (1: full size, or not a JPEG)."""
    if img.format != "JPEG":
        return 1
    room = min(plan.height / (out_hw[0] + 1), plan.width / (out_hw[1] + 1))
    s = next((s for s in DCT_SCALES if s <= room), 1)
    if s > 1:
        # PIL picks the largest reduction <= min(W // w, H // h) of the requested size
        img.draft(img.mode, (max(1, img.width // s), max(1, img.height // s)))
    return s


def crop_box(plan: CropPlan, decoded_hw: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """The planned box ``(top, left, bottom, right)`` in pixels of a decode of size ``decoded_hw``
    (the full size, or a DCT-reduced one): scaled and rounded to whole pixels (exact at full size)."""
    sy, sx = decoded_hw[0] / plan.image_hw[0], decoded_hw[1] / plan.image_hw[1]
    top, left = round(plan.top * sy), round(plan.left * sx)
    bottom, right = max(top + 1, round((plan.top + plan.height) * sy)), max(left + 1, round((plan.left + plan.width) * sx))
    return top, left, bottom, right


def apply_crop(pixels: torch.Tensor, plan: CropPlan, out_hw: Tuple[int, int], uint8_resize: Optional[bool] = None) -> torch.Tensor:
    """``pixels`` (uint8 ``(3, h, w)``, any device; a full-size or reduced decode of the planned image)
    -> the planned crop, resized to ``out_hw`` (bicubic, antialiased) and flipped: uint8 ``(3, H, W)``.

    The box is mapped to the decoded size by :func:`crop_box`. ``uint8_resize`` (default: on the CPU,
    where torch has a fast uint8 kernel) resizes the 8-bit pixels directly; otherwise (CUDA) in fp32,
    rounded back to uint8."""
    top, left, bottom, right = crop_box(plan, tuple(pixels.shape[-2:]))
    crop = pixels[:, top:bottom, left:right].unsqueeze(0)
    if uint8_resize is None:
        uint8_resize = pixels.device.type == "cpu"
    if uint8_resize:  # the uint8 kernel wants channels-last
        out = F.interpolate(crop.contiguous(memory_format=torch.channels_last), size=out_hw, mode="bicubic", antialias=True, align_corners=False)
    else:
        out = F.interpolate(crop.float(), size=out_hw, mode="bicubic", antialias=True, align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
    out = out[0]
    return out.flip(-1) if plan.flip else out  # channels-last memory: the batch's stack copies it anyway


def rgb_pixels(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 ``(3, H, W)`` view of a copy of its pixels (HWC memory)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


class PretrainCrop:
    """The ``data.decode=cpu`` augmentation: a random crop of ``img_size`` (``scale``: area fraction
    range) and a flip with probability ``hflip``, as uint8 ``(3, H, W)``.

    ``from_file(path)`` decodes the file at the smallest DCT scale that covers the crop (JPEGs) and
    raises :class:`~greenmim.data.images.CorruptImageError` for unreadable files (the dataset calls
    it); calling it on a PIL image crops a picture already in memory (generated ones)."""

    def __init__(self, img_size: Union[int, Sequence[int]], scale: Sequence[float] = DEFAULT_CROP_SCALE, hflip: float = DEFAULT_HFLIP):
        self.out_hw = image_hw(img_size)
        self.scale = tuple(float(v) for v in scale)
        self.hflip = float(hflip)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        plan = draw_crop(img, self.scale, self.hflip)
        return apply_crop(rgb_pixels(to_rgb(img)), plan, self.out_hw)

    def from_file(self, path: str) -> torch.Tensor:
        data, img = read_image(path)
        return self.crop_opened(img, path, data)

    def crop_opened(self, img: Image.Image, path: str, data: Optional[bytes] = None) -> torch.Tensor:
        """The crop of a lazily opened ``img`` (of file ``path``, whose bytes are ``data``). A JPEG
        decoded at full size goes through torchvision's decoder when ``data`` is given (it skips
        PIL's 4-byte pixel layout: ~10% faster); a reduced one through PIL's DCT-scaled draft."""
        plan = draw_crop(img, self.scale, self.hflip)
        if draft_for_crop(img, plan, self.out_hw) == 1 and data is not None and torch_decodes(img):
            pixels = decode_jpeg_rgb(torch.frombuffer(bytearray(data), dtype=torch.uint8), path)
        else:
            pixels = rgb_pixels(decode_rgb(img, path))
        return apply_crop(pixels, plan, self.out_hw)


def pretrain_transform(img_size: Union[int, Sequence[int]], scale: Sequence[float] = DEFAULT_CROP_SCALE, hflip: float = DEFAULT_HFLIP) -> PretrainCrop:
    """The pretraining augmentation of ``img_size`` images (uint8 output; see :class:`PretrainCrop`)."""
    return PretrainCrop(img_size, scale, hflip)


def eval_transform(
    img_size: Union[int, Sequence[int]], mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> T.Compose:
    """Deterministic resize of the short side + centre crop, normalised fp32 (for visualisation)."""
    hw = image_hw(img_size)
    return T.Compose([T.Resize(min(hw), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(hw), T.ToTensor(), T.Normalize(mean, std)])


def denormalize(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Normalised ``(..., 3, H, W)`` -> pixels in [0, 1] (clamped)."""
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(3, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(3, 1, 1)
    return (images * s + m).clamp(0, 1)
