"""Reading image files as RGB, and the errors users see for bad data.

:func:`load_rgb` opens any file PIL reads and returns an RGB image: palette, grey, 16-bit and
alpha images are converted (transparent areas composited on white). A dataset's conversions are
counted (:mod:`greenmim.engine.image_counts`, one total per epoch); others are reported once per mode. Unreadable files raise :class:`CorruptImageError`.
"""
from __future__ import annotations

import io
import logging
import os
import warnings
from typing import List, Sequence, Set, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageFile
from torchvision.io import ImageReadMode, decode_jpeg

from ..engine.errors import UserError
from ..engine.progress import progress
from ..engine.image_counts import MODE_NAMES, note_conversion

log = logging.getLogger("greenmim")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

_reported_modes: Set[str] = set()  # modes reported by images read outside a dataset (a dataset counts them)


class DataError(UserError):
    """A problem with the data folder or its files; the message names the fix."""


class CorruptImageError(DataError):
    """An image file that cannot be decoded."""


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def to_rgb(img: Image.Image, path: str = "") -> Image.Image:
    """``img`` as an 8-bit RGB image (alpha composited on white, high-bit-depth greys rescaled)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if not note_conversion(mode) and mode not in _reported_modes:  # a dataset's conversions are totalled per epoch
        _reported_modes.add(mode)
        log.warning("converting %s (%s) image(s) to RGB, e.g. %s (each mode is reported once)", mode, MODE_NAMES.get(mode, mode), path or "<image>")
    if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's "palette images with transparency" advice
            rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _unreadable(path: str, exc: Exception) -> CorruptImageError:
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return CorruptImageError(f"cannot read image {path} ({reason}); remove or replace the file")


def read_image(path: str) -> Tuple[bytes, Image.Image]:
    """The bytes of ``path`` and the image opened lazily on them (header only: size, mode, format;
    :func:`decode_rgb` decodes the pixels). Raises :class:`CorruptImageError` if the file cannot be
    read or is not an image PIL reads. Nothing stays open."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        return data, Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises many types for bad files
        raise _unreadable(path, exc) from exc


def open_image(path: str) -> Image.Image:
    """``path`` opened lazily (see :func:`read_image`)."""
    return read_image(path)[1]


def decode_rgb(img: Image.Image, path: str = "") -> Image.Image:
    """Decode a lazily opened ``img`` (at the scale a ``draft`` set, if any) and return it as RGB;
    raises :class:`CorruptImageError` naming ``path`` if its data cannot be decoded."""
    try:
        img.load()
    except Exception as exc:  # PIL raises many types for bad files
        raise _unreadable(path, exc) from exc
    return to_rgb(img, path)


#: JPEG modes ``torchvision.io.decode_jpeg(mode=RGB)`` converts as PIL does (others go through PIL)
TORCH_JPEG_MODES = ("RGB", "L")


def torch_decodes(img: Image.Image) -> bool:
    """Whether :func:`decode_jpeg_rgb` takes the file of lazily opened ``img``."""
    return img.format == "JPEG" and img.mode in TORCH_JPEG_MODES


def decode_jpeg_rgb(data: torch.Tensor, path: str = "", device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """JPEG bytes (uint8 ``(N,)``) -> RGB uint8 ``(3, H, W)`` on ``device`` with torchvision's decoder
    (libjpeg-turbo on the CPU, nvJPEG on CUDA); raises :class:`CorruptImageError` naming ``path``."""
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:
        raise _unreadable(path, exc) from exc


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully and return it as RGB; raises :class:`CorruptImageError` if it cannot be read."""
    return decode_rgb(open_image(path), path)


#: validation sets up to this many images are decoded in full before training; larger ones only have
#: their headers read (a few ms per file), so a bad set fails in seconds, not after an epoch
DECODE_CHECK_LIMIT = 2000


def unreadable_images(paths: Sequence[str], decode_limit: int = DECODE_CHECK_LIMIT, what: str = "image(s)") -> List[Tuple[str, str]]:
    """``[(path, why), ...]`` of the files that do not open (all decoded when there are at most
    ``decode_limit``, else headers only); ``what`` names them in the progress display."""
    full = len(paths) <= decode_limit
    bad = []
    for path in progress(paths, f"checking {len(paths)} {what}", unit="images"):
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                if full:
                    img.load()
        except Exception as exc:  # PIL raises many types for bad files
            bad.append((path, f"{type(exc).__name__}: {exc}".replace("\n", " ")))
    return bad


def check_images(paths: Sequence[str], what: str, hint: str) -> None:
    """Raise :class:`CorruptImageError` naming the unreadable files among ``paths`` (``what``: e.g.
    "validation image(s)"; ``hint``: the fix)."""
    bad = unreadable_images(paths, what=what)
    if bad:
        examples = "; ".join(f"{p} ({why})" for p, why in bad[:3])
        raise CorruptImageError(f"{len(bad)} unreadable {what}, e.g. {examples}: {hint}")


def check_root(root, what: str = "data.root") -> str:
    """``root`` as a string; raises :class:`DataError` if it is unset or not a folder."""
    if root in (None, "", "???"):
        raise DataError(f"{what} is not set: pass {what}=/path/to/images (or use data=synthetic for a run without data)")
    root = os.path.expanduser(str(root))
    if not os.path.exists(root):
        raise DataError(f"{what}={root} does not exist: point it at a folder of images (or use data=synthetic)")
    if not os.path.isdir(root):
        raise DataError(f"{what}={root} is a file, not a folder: point it at the folder that contains the images")
    return root


# Truncated JPEGs are errors by default (counted and skipped, or fatal with data.on_corrupt=error).
ImageFile.LOAD_TRUNCATED_IMAGES = False
