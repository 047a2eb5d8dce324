"""Pictures of what a pretraining model sees and predicts: ``original | masked | reconstruction``
grids (the pretraining task's per-epoch figure and ``greenmim-visualize``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw

from ...data import denormalize
from ...engine.files import atomic_write
from ...plan.masking import unit_grid
from ...models.pretrain import unpatchify


def reconstruction_grid(model: nn.Module, images: torch.Tensor, mask_ratio: float, seed: int = 0, min_cell: int = 128) -> np.ndarray:
    """Render ``original | masked | reconstruction`` rows for ``images`` (normalised ``(B, 3, H, W)``).

    Masks are drawn from a private generator seeded with ``seed`` (the same masks every call).
    Reconstructions paste the predictions of the masked units, un-normalised with each unit's mean
    and std when the model regresses normalised pixels, into the visible units of the original.
    Masked units are shown in grey. Returns an ``(H', W', 3)`` uint8 picture with a header row.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _, pred, mask = model(images, mask_ratio=mask_ratio, generator=gen)
        out = model.reconstruct(images, pred, mask)
    model.train(was_training)
    grid = unit_grid(images.shape[-2:], model.unit)
    unit_px = mask.float().unsqueeze(-1).expand(-1, -1, model.unit * model.unit * 3).to(images.device)
    pix_mask = unpatchify(unit_px, grid) > 0.5
    original = denormalize(images.float())
    masked = torch.where(pix_mask, torch.full_like(original, 0.5), original)
    recon = denormalize(out["reconstruction"].float())
    cols = [original, masked, recon]
    b, _, h, w = images.shape
    scale = max(1, -(-min_cell // max(h, w)))
    pad, header = 4, 18
    cell_h, cell_w = h * scale, w * scale
    canvas = Image.new("RGB", (3 * cell_w + 4 * pad, header + b * (cell_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(("original", f"masked {mask_ratio:.0%}", "reconstruction")):
        draw.text((pad + j * (cell_w + pad) + 2, 3), title, fill=(0, 0, 0))
    for i in range(b):
        for j, col in enumerate(cols):
            arr = (col[i].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(arr).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (pad + j * (cell_w + pad), header + i * (cell_h + pad)))
    return np.array(canvas)


def save_png(picture: np.ndarray, path: Path) -> Path:
    """Write an ``(H, W, 3)`` uint8 picture atomically (creating its folder), as PNG or in the format
    ``path``'s suffix names (``.jpg``); returns the path. Write failures are :class:`OSError`."""
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    atomic_write({path: lambda f: Image.fromarray(picture).save(f, format=image_format)})
    return path
