"""Dense masked reference for the visible-only PVTv2 and the tiny PVTv2 configs its tests share:
timm's own modules on the full token grid, hidden positions zeroed before every convolution (stem,
downsamplings, the MLP's depthwise conv, the spatial reduction) and never attention keys: what the
visible-only encoder must reproduce at the visible positions."""
import timm
import torch

from greenmim.models import create_encoder
from twins_reference import gsa_reference, keep_tokens, zero_masked

# tiny configs: the timm default sr_ratios (one reduced key per unit) on a non-square grid, and
# sr_ratios below the tokens per unit side (several reduced keys per unit, none at stage 3)
DEFAULT_SR = dict(name="pvt_v2_b0", img_size=(96, 128), embed_dims=(16, 24, 32, 40), num_heads=(1, 2, 2, 4),
                  mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 2, 1))
SMALL_SR = dict(name="pvt_v2_b1", img_size=96, embed_dims=(16, 16, 24, 32), num_heads=(1, 2, 2, 4),
                mlp_ratios=(2, 2, 2, 2), depths=(2, 1, 1, 1), sr_ratios=(4, 2, 1, 1))
CONFIGS = {"default_sr": DEFAULT_SR, "small_sr": SMALL_SR}


def build(cfg, backend="native", method="greenmim", seed=0):
    """(timm model with a head, greenmim encoder loaded from it); timm's PVTv2 takes no img_size."""
    cfg = dict(cfg)
    name = cfg.pop("name")
    torch.manual_seed(seed)
    ref = timm.create_model(name, **{k: v for k, v in cfg.items() if k != "img_size"}).eval()
    extra = dict(sparse_backend=backend) if method == "greenmim" else {}
    enc = create_encoder(name, method=method, **extra, **cfg).eval()
    missing, unexpected = enc.load_state_dict(ref.state_dict(), strict=False)
    assert not missing and all(k.startswith("head.") for k in unexpected) and unexpected
    return ref, enc


def mlp_reference(mlp, x, size, keep):
    """timm's MlpWithDepthwiseConv with hidden positions zeroed before its depthwise conv."""
    b = x.shape[0]
    h = zero_masked(mlp.relu(mlp.fc1(x)), keep)
    h = mlp.dwconv(h.transpose(1, 2).reshape(b, -1, *size)).flatten(2).transpose(1, 2)
    return mlp.fc2(mlp.act(h))


def dense_masked_reference(model, images, mask):
    """Per-stage (B, N, C) tokens on the full grid (after each stage's norm) and the final visible
    units (B, N_vis, C)."""
    b = images.shape[0]
    unit = model.patch_embed.proj.stride[0] * 2 ** (len(model.stages) - 1)
    grid = (images.shape[2] // unit, images.shape[3] // unit)
    x = torch.where(keep_tokens(mask, grid, unit).view(b, 1, *images.shape[2:]), images, torch.zeros_like(images))
    x = model.patch_embed(x)  # (B, H, W, C): zero padding = out-of-image pixels are zero
    stages, keep, size = [], None, None
    for stage in model.stages:
        if stage.downsample is not None:  # (B, N, C) tokens of the previous stage, hidden ones zeroed
            x = stage.downsample(zero_masked(x, keep).transpose(1, 2).reshape(b, -1, *size))
        size = x.shape[1:3]  # x: (B, H, W, C) from the stem or a downsampling
        x = x.reshape(b, -1, x.shape[-1])
        t = size[0] // grid[0]
        keep = keep_tokens(mask, grid, t)
        for blk in stage.blocks:
            x = x + gsa_reference(blk.attn, blk.norm1(x), size, keep, mask, grid, t)
            x = x + mlp_reference(blk.mlp, blk.norm2(x), size, keep)
        x = stage.norm(x)
        stages.append(x)
    final = stages[-1][~mask].view(b, -1, stages[-1].shape[-1])
    return stages, final
