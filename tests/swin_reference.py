"""Dense masked reference for the visible-only Swin (V1 and V2): timm's own modules on the full
token grid, with masked tokens removed from every attention's keys.

Masked tokens still flow through the dense network (their values are garbage), but they never
reach a visible token: attention ignores them as keys and every 2x2 merge sees all-visible or
all-masked blocks. The visible tokens' outputs are what the visible-only encoder must reproduce.
"""
import torch
from timm.models.swin_transformer import window_partition, window_reverse

MASKED_KEY = -1e4  # large negative, not -inf: rows of fully masked windows stay finite


def token_mask(mask, grid, t):
    """(B, num_units) unit mask -> (B, H, W) token mask at t tokens per unit side."""
    b = mask.shape[0]
    m = mask.view(b, grid[0], 1, grid[1], 1).expand(-1, -1, t, -1, t)
    return m.reshape(b, grid[0] * t, grid[1] * t)


def masked_block(block, x, tmask):
    """timm SwinTransformerBlock (or V2 block: residual post-norm) forward with masked tokens excluded
    as attention keys."""
    b, h, w, c = x.shape
    ws, ss = block.window_size, block.shift_size
    post_norm = hasattr(block.attn, "cpb_mlp")  # Swin V2
    y = x if post_norm else block.norm1(x)
    m = tmask
    if any(ss):
        y = torch.roll(y, shifts=(-ss[0], -ss[1]), dims=(1, 2))
        m = torch.roll(m, shifts=(-ss[0], -ss[1]), dims=(1, 2))
    n = ws[0] * ws[1]
    yw = window_partition(y, ws).view(-1, n, c)
    mw = window_partition(m.unsqueeze(-1).float(), ws).view(-1, n)
    attn_mask = (mw > 0).float().unsqueeze(1).expand(-1, n, -1) * MASKED_KEY
    if block.attn_mask is not None:
        attn_mask = attn_mask + block.attn_mask.repeat(b, 1, 1)
    out = block.attn(yw, mask=attn_mask).view(-1, ws[0], ws[1], c)
    out = window_reverse(out, ws, h, w)
    if any(ss):
        out = torch.roll(out, shifts=ss, dims=(1, 2))
    if post_norm:
        x = x + block.drop_path1(block.norm1(out))
        return x + block.drop_path2(block.norm2(block.mlp(x)))
    x = x + block.drop_path1(out)
    x = x + block.drop_path2(block.mlp(block.norm2(x)))
    return x


def dense_masked_swin(model, images, mask):
    """Run a timm SwinTransformer (or SwinTransformerV2) with masked keys ignored.

    Returns (final visible-unit features (B, N_vis, C) in ascending raster order, per-stage dense
    maps (B, H_i, W_i, C_i) before the final norm).
    """
    unit = model.patch_embed.patch_size[0] * 2 ** (len(model.layers) - 1)
    grid = (images.shape[-2] // unit, images.shape[-1] // unit)
    x = model.patch_embed(images)
    stages = []
    for i, layer in enumerate(model.layers):
        x = layer.downsample(x)
        tm = token_mask(mask, grid, x.shape[1] // grid[0])
        for block in layer.blocks:
            x = masked_block(block, x, tm)
        stages.append(x)
    out = model.norm(x).reshape(x.shape[0], -1, x.shape[-1])
    n_vis = int((~mask[0]).sum())
    return out[~mask].view(x.shape[0], n_vis, -1), stages
