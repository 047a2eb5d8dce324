"""The light MIM decoder: encoder features -> pixels of every mask unit."""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block


@lru_cache(maxsize=16)
def sincos_pos_embed_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding ``(height * width, dim)`` in raster order (MAE's layout:
    the first half of the channels encodes the row, the second half the column)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")

    def one_axis(positions: np.ndarray, d: int) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = positions.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gy, gx = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    emb = np.concatenate([one_axis(gy, dim // 2), one_axis(gx, dim // 2)], axis=1)
    return torch.from_numpy(emb).float()


class MIMDecoder(nn.Module):
    """Linear to decoder width -> mask tokens at masked units -> sin-cos positions -> transformer
    blocks -> linear to ``unit * unit * 3`` pixels per unit.

    ``grid_size``: the unit grid ``(height, width)`` of the images.

    ``forward(latent, mask, grid, vis_idx)``: ``latent`` is ``(B, N_vis, C)`` (visible units in the
    ascending raster order of ``vis_idx``) or, with ``visible_only=False``, ``(B, num_units, C)``
    (the all-token baseline, whose encoder already filled the masked units); returns
    ``(B, num_units, unit*unit*3)``.
    """

    def __init__(
        self,
        in_dim: int,
        unit: int,
        dim: int = 512,
        depth: int = 1,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        visible_only: bool = True,
        grid_size: Tuple[int, int] = (7, 7),
    ):
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(in_dim, dim)
        if visible_only:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.normal_(self.mask_token, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, unit * unit * 3)
        # a non-persistent buffer: it moves with the module, so a step copies nothing to the device,
        # and checkpoints stay as they were
        self.grid_size = tuple(grid_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, *self.grid_size), persistent=False)

    def forward(self, latent: torch.Tensor, mask: torch.Tensor, grid, vis_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, num_units = mask.shape
        x = self.embed(latent)
        if vis_idx is not None:
            # visible units only: scatter them between mask tokens at their own positions
            full = self.mask_token.to(x.dtype).expand(b, num_units, -1).clone()
            x = full.scatter(1, vis_idx.unsqueeze(-1).expand(-1, -1, self.dim), x)
        if (grid.height, grid.width) != self.grid_size:
            raise ValueError(f"decoder built for a {self.grid_size} unit grid, got {grid.height}x{grid.width}")
        x = self.blocks(x + self.pos_embed.to(x.dtype))
        return self.pred(self.norm(x))
