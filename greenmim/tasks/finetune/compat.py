"""Compatibility fixes for third-party versions, applied where they are needed (a RandAugment transform
is built), never at import time.

* timm's RandAugment ``PosterizeIncreasing`` keeps ``0`` bits at the top magnitude (``m9-mstd0.5`` reaches
  the clip value 10 for ~2% of draws). Pillow < 11 turned ``posterize(img, 0)`` into a black image;
  Pillow >= 11 raises ``ValueError: bits must be between or equal to 1 and 8`` and kills the data
  loader. :func:`patch_timm_posterize` restores the old result (every bit cleared) when, and only
  when, the installed Pillow rejects 0 bits.
"""
from __future__ import annotations

from PIL import Image, ImageOps


def _pillow_rejects_zero_bits() -> bool:
    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
    except ValueError:
        return True
    return False


def posterize(img: Image.Image, bits_to_keep: int, **__) -> Image.Image:
    """timm's ``posterize`` with Pillow < 11's result for ``bits_to_keep <= 0`` (an all-zero image)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def patch_timm_posterize() -> bool:
    """Route timm's Posterize ops through :func:`posterize` if Pillow rejects 0 bits; returns whether it did."""
    from timm.data import auto_augment

    if not _pillow_rejects_zero_bits():
        return False
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = posterize
    return True
