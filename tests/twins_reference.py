"""Dense masked reference for the visible-only Twins and the tiny Twins configs the tests share:
timm's own modules on the full token grid, masked tokens never attention keys and zeroed before every
convolution (what the visible-only encoder must reproduce on the visible tokens)."""
import pytest
import timm
import torch

from greenmim.plan.masking import random_mask
from greenmim.models import create_encoder
# tiny configs: windows of 3 tokens cross the 8x8-token units of stage 1; sr_ratios below the
# tokens per unit side (SVT) give several reduced keys per unit
SVT = dict(name="twins_svt_small", img_size=96, embed_dims=(16, 24, 32, 40), num_heads=(1, 2, 2, 4),
           mlp_ratios=(2, 2, 2, 2), depths=(2, 2, 2, 2), wss=(3, 3, 3, 3), sr_ratios=(4, 2, 2, 1))
PCPVT = dict(name="twins_pcpvt_small", img_size=(96, 128), embed_dims=(16, 24, 32, 40), num_heads=(1, 2, 2, 4),
             mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 2, 1))
CONFIGS = {"svt": SVT, "pcpvt": PCPVT}
BACKENDS = ["native", "spconv"]


def build(cfg, backend="native", seed=0):
    """(timm model with a head, greenmim encoder loaded from it)."""
    cfg = dict(cfg)
    name = cfg.pop("name")
    torch.manual_seed(seed)
    ref = timm.create_model(name, **cfg).eval()
    enc = create_encoder(name, sparse_backend=backend, **cfg).eval()
    missing, unexpected = enc.load_state_dict(ref.state_dict(), strict=False)
    assert not missing and all(k.startswith("head.") for k in unexpected) and unexpected
    return ref, enc


def inputs(enc, batch=2, ratio=0.75, seed=0, shared=False):
    gen = torch.Generator().manual_seed(seed)
    h, w = enc.patch_embed.img_size
    images = torch.randn(batch, 3, h, w, generator=gen)
    mask = random_mask(batch, (h // enc.unit) * (w // enc.unit), ratio, generator=gen, shared=shared)
    return images, mask


def skip_without(backend):
    if backend == "spconv":
        pytest.importorskip("spconv.pytorch")


# -- the dense masked reference: timm's modules on the full grid ----------------------------------
def keep_tokens(mask, grid, t):
    """(B, H*W) bool, True at tokens of visible units, raster order of the stage grid."""
    b = mask.shape[0]
    keep = (~mask).view(b, grid[0], 1, grid[1], 1).expand(-1, -1, t, -1, t)
    return keep.reshape(b, grid[0] * t * grid[1] * t)


def zero_masked(x, keep):
    return torch.where(keep.unsqueeze(-1), x, torch.zeros_like(x))


def masked_attention(q, k, v, key_keep):
    # a finite large negative keeps rows of masked queries finite (their outputs are never read)
    bias = torch.zeros(key_keep.shape).masked_fill(~key_keep, -1e9)
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias, dim=-1) @ v


def lsa_reference(attn, x, size, keep):
    b, n, c = x.shape
    (H, W), ws, h = size, attn.ws, attn.num_heads

    def windows(a):
        return a.view(b, H // ws, ws, W // ws, ws, a.shape[-1]).transpose(2, 3).reshape(b, -1, ws * ws, a.shape[-1])

    q, k, v = windows(attn.qkv(x)).unflatten(-1, (3, h, c // h)).permute(3, 0, 1, 4, 2, 5)
    key_keep = windows(keep.unsqueeze(-1).float())[..., 0] > 0
    out = masked_attention(q, k, v, key_keep[:, :, None, None, :])  # (b, nw, h, ws*ws, d)
    out = out.permute(0, 1, 3, 2, 4).reshape(b, H // ws, W // ws, ws, ws, c).transpose(2, 3).reshape(b, n, c)
    return attn.proj(out)


def gsa_reference(attn, x, size, keep, mask, grid, t):
    b, n, c = x.shape
    h = attn.num_heads
    q = attn.q(x).view(b, n, h, c // h).transpose(1, 2)
    kv_in, kv_keep = x, keep
    if attn.sr is not None:
        dense = zero_masked(x, keep).transpose(1, 2).reshape(b, c, *size)
        kv_in = attn.norm(attn.sr(dense).flatten(2).transpose(1, 2))
        kv_keep = keep_tokens(mask, grid, t // attn.sr.stride[0])  # Twins GSA and PVTv2 SRA alike
    k, v = attn.kv(kv_in).view(b, -1, 2, h, c // h).permute(2, 0, 3, 1, 4)
    out = masked_attention(q, k, v, kv_keep[:, None, None, :])
    return attn.proj(out.transpose(1, 2).reshape(b, n, c))


def dense_masked_reference(model, images, mask):
    """Per-stage (B, N, C) tokens on the full grid and the final normed visible units (B, N_vis, C):
    masked tokens are never attention keys and are zeroed before every convolution."""
    from timm.models.twins import LocallyGroupedAttn

    b = images.shape[0]
    unit = model.patch_embeds[0].patch_size[0] * 2 ** (len(model.blocks) - 1)
    grid = (images.shape[2] // unit, images.shape[3] // unit)
    x = torch.where(keep_tokens(mask, grid, unit).view(b, 1, *images.shape[2:]), images, torch.zeros_like(images))
    stages = []
    for embed, blocks, pos_blk in zip(model.patch_embeds, model.blocks, model.pos_block):
        x, size = embed(x)
        t = size[0] // grid[0]
        keep = keep_tokens(mask, grid, t)
        for j, blk in enumerate(blocks):
            y = blk.norm1(x)
            if isinstance(blk.attn, LocallyGroupedAttn):
                y = lsa_reference(blk.attn, y, size, keep)
            else:
                y = gsa_reference(blk.attn, y, size, keep, mask, grid, t)
            x = x + y
            x = x + blk.mlp(blk.norm2(x))
            if j == 0:
                x = pos_blk(zero_masked(x, keep), size)
        stages.append(x)
        x = zero_masked(x, keep).transpose(1, 2).reshape(b, -1, *size)
    final = model.norm(stages[-1])[~mask].view(b, -1, stages[-1].shape[-1])
    return stages, final


def dense_visible(tokens, mask, grid, t):
    """(B, N, C) full-grid tokens -> (B, C, H, W) with zeros at masked units (to compare with tokens_to_grid)."""
    b, n, c = tokens.shape
    keep = keep_tokens(mask, grid, t)
    return zero_masked(tokens, keep).transpose(1, 2).reshape(b, c, grid[0] * t, grid[1] * t)
