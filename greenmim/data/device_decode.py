"""``data.decode=device``: the loader workers read bytes and draw crops, the main process decodes.

A worker's part of a JPEG is reading the file, parsing its header and drawing the
:class:`~greenmim.data.transforms.CropPlan` (the same draws as ``data.decode=cpu``, so a seed gives
the same crops either way): well under a millisecond. :meth:`EncodedBatch.to` then decodes the
batch's JPEGs in one ``torchvision.io.decode_jpeg`` call on the target device (nvJPEG on CUDA,
libjpeg on the CPU) and crops, resizes (bicubic, antialiased) and flips each on that device, giving
the uint8 ``(B, 3, H, W)`` batch of the CPU path. The prefetcher
(:mod:`greenmim.data.prefetch`) runs it one step ahead, off the training thread.

Files the batched decoder does not take (PNG, GIF, CMYK JPEGs, ...) and generated pictures are
cropped in the worker as with ``data.decode=cpu`` and travel as finished pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from .images import CorruptImageError, decode_jpeg_rgb, read_image, torch_decodes
from .transforms import DEFAULT_CROP_SCALE, DEFAULT_HFLIP, CropPlan, PretrainCrop, apply_crop, draw_crop

@dataclass
class EncodedImage:
    """One sample: JPEG ``data`` (uint8 ``(N,)``) with its crop ``plan``, or the finished crop
    ``pixels`` (uint8 ``(3, H, W)``) of a file decoded in the worker; ``out_hw``: the output size."""

    path: str
    out_hw: Tuple[int, int]
    data: Optional[torch.Tensor] = None
    plan: Optional[CropPlan] = None
    pixels: Optional[torch.Tensor] = None


class DeviceCrop:
    """The ``data.decode=device`` augmentation (same arguments and draws as
    :class:`~greenmim.data.transforms.PretrainCrop`); samples are :class:`EncodedImage`."""

    def __init__(self, img_size: Union[int, Sequence[int]], scale: Sequence[float] = DEFAULT_CROP_SCALE, hflip: float = DEFAULT_HFLIP):
        self.cpu = PretrainCrop(img_size, scale, hflip)

    def __call__(self, img: Image.Image) -> EncodedImage:
        return EncodedImage("<generated>", self.cpu.out_hw, pixels=self.cpu(img))

    def from_file(self, path: str) -> EncodedImage:
        data, img = read_image(path)
        if not torch_decodes(img):
            return EncodedImage(path, self.cpu.out_hw, pixels=self.cpu.crop_opened(img, path, data))
        plan = draw_crop(img, self.cpu.scale, self.cpu.hflip)
        return EncodedImage(path, self.cpu.out_hw, data=torch.frombuffer(bytearray(data), dtype=torch.uint8), plan=plan)


class EncodedBatch:
    """A batch of :class:`EncodedImage`; ``.to(device)`` decodes it there (see the module doc)."""

    def __init__(self, items: Sequence[EncodedImage]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def pin_memory(self) -> "EncodedBatch":
        return self  # the decoder reads the host bytes itself; pinning many small buffers costs more than it saves

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> torch.Tensor:
        """The uint8 ``(B, 3, H, W)`` batch on ``device``."""
        device = torch.device(device)
        jpegs = [i for i, item in enumerate(self.items) if item.data is not None]
        decoded = decode_jpegs([self.items[i] for i in jpegs], device)
        out: List[Optional[torch.Tensor]] = [None] * len(self.items)
        for i, pixels in zip(jpegs, decoded):
            out[i] = apply_crop(pixels, self.items[i].plan, self.items[i].out_hw)
        for i, item in enumerate(self.items):
            if item.data is None:
                out[i] = item.pixels.to(device, non_blocking=non_blocking)
        return torch.stack(out)


def decode_jpegs(items: Sequence[EncodedImage], device: torch.device) -> List[torch.Tensor]:
    """RGB uint8 ``(3, h, w)`` of every item's JPEG data, on ``device``, in one batched call; if that
    fails, one by one, so that the file that does not decode is named (:class:`CorruptImageError`)."""
    if not items:
        return []
    try:
        return list(decode_jpeg([item.data for item in items], mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        return [decode_one(item, device) for item in items]


def decode_one(item: EncodedImage, device: torch.device) -> torch.Tensor:
    try:
        return decode_jpeg_rgb(item.data, item.path, device)
    except CorruptImageError as exc:
        raise CorruptImageError(f"{exc}, or use data.decode=cpu (it decodes in the loader workers, where "
                                "data.on_corrupt=skip can skip such files)") from None
