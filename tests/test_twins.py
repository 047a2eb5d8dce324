"""Visible-only Twins: timm's weights and outputs at mask ratio 0, a dense masked reference at 0.75,
backends agreeing, the all-token baseline, and a pretraining step for each method and backend."""
import pytest
import timm
import torch

from greenmim.masking import random_mask
from greenmim.models import create_encoder, create_pretrain_model, list_encoders
from greenmim.ops.windows import tokens_to_grid

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
        kv_keep = keep_tokens(mask, grid, t // attn.sr_ratio)
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


# -- tests ---------------------------------------------------------------------------------------
def test_registry_matches_timm_entrypoints():
    names = list_encoders("twins")
    assert names == sorted(f"twins_{k}_{s}" for k in ("pcpvt", "svt") for s in ("small", "base", "large"))

    def arch(model):
        blocks = [b.attn for stage in model.blocks for b in stage]
        return [(type(a).__name__, a.num_heads, getattr(a, "ws", None), getattr(a, "sr_ratio", None)) for a in blocks]

    for name in names:  # on the meta device: shapes and structure only, no memory
        ours = create_encoder(name, sparse_backend="native", device="meta")
        ref = timm.create_model(name, device="meta")
        shapes = {k: v.shape for k, v in ref.state_dict().items() if not k.startswith("head.")}
        assert {k: v.shape for k, v in ours.state_dict().items()} == shapes, name
        assert arch(ours) == arch(ref), name
        assert ours.unit == 32 and ours.visible_only and ours.num_features == ref.num_features


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["svt", "pcpvt"])
def test_equals_timm_at_ratio_0(kind, backend):
    skip_without(backend)
    ref, enc = build(CONFIGS[kind], backend)
    images, mask = inputs(enc, ratio=0.0)
    with torch.no_grad():
        expected = ref.forward_features(images)
        got = enc(images, mask)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,shared", [("svt", False), ("pcpvt", False), ("svt", True)])
def test_equals_dense_masked_reference(kind, shared):
    ref, enc = build(CONFIGS[kind])
    images, mask = inputs(enc, ratio=0.75, seed=3, shared=shared)
    grid = (images.shape[2] // enc.unit, images.shape[3] // enc.unit)
    with torch.no_grad():
        ref_stages, ref_final = dense_masked_reference(ref, images, mask)
        stages = enc.forward_stages(images, mask)
        final = enc(images, mask)
    assert final.shape == (2, int((~mask[0]).sum()), enc.num_features)
    torch.testing.assert_close(final, ref_final, atol=1e-5, rtol=1e-5)
    for i, (got, expected) in enumerate(zip(stages, ref_stages)):
        t = enc.tokens_per_unit(i)
        got, expected = tokens_to_grid(got, mask, grid, t), dense_visible(expected, mask, grid, t)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"stage {i}")


def test_fused_and_plain_attention_agree():
    _, enc = build(SVT)
    images, mask = inputs(enc)
    with torch.no_grad():
        fused = enc(images, mask)
        enc.fused_attn = False
        plain = enc(images, mask)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    assert set(enc.last_grouping) == {"ms", "efficiency", "inline"} and enc.last_grouping["inline"] == 1.0 and 0 < enc.last_grouping["efficiency"] <= 1


@pytest.mark.parametrize("kind", ["svt", "pcpvt"])
def test_backends_agree_values_and_gradients(kind):
    pytest.importorskip("spconv.pytorch")
    _, native = build(CONFIGS[kind], "native")
    _, sparse = build(CONFIGS[kind], "spconv")
    images, mask = inputs(native, seed=5)
    out_n, out_s = native(images, mask), sparse(images, mask)
    torch.testing.assert_close(out_n, out_s, atol=1e-5, rtol=1e-5)
    weight = torch.randn(out_n.shape, generator=torch.Generator().manual_seed(1))
    (out_n * weight).sum().backward()
    (out_s * weight).sum().backward()
    grads_s = dict(sparse.named_parameters())
    for name, p in native.named_parameters():
        torch.testing.assert_close(p.grad, grads_s[name].grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["svt", "pcpvt"])
def test_all_token_baseline_equals_timm_without_mask(kind):
    cfg = dict(CONFIGS[kind])
    name = cfg.pop("name")
    torch.manual_seed(0)
    ref = timm.create_model(name, **cfg).eval()
    enc = create_encoder(name, method="simmim", **cfg).eval()
    enc.load_state_dict(ref.state_dict(), strict=False)
    images, mask = inputs(enc, ratio=0.0)
    token = torch.randn(enc.embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(enc(images, mask, token), ref.forward_features(images), atol=1e-5, rtol=1e-5)
        images, mask = inputs(enc, ratio=0.75)
        assert enc(images, mask, token).shape == (2, mask.shape[1], enc.num_features)


@pytest.mark.parametrize(
    "method,backend", [("greenmim", "native"), ("greenmim", "spconv"), ("greenmim", "auto"), ("simmim", "native")]
)
def test_pretraining_step(method, backend):
    skip_without(backend)
    cfg = dict(SVT)
    name = cfg.pop("name")
    torch.manual_seed(0)
    model = create_pretrain_model(
        name, method=method, sparse_backend=backend, decoder_dim=32, decoder_heads=2, drop_path_rate=0.1, **cfg
    )
    images = torch.randn(2, 3, 96, 96)
    loss, pred, mask = model(images, mask_ratio=0.75)
    loss.backward()
    assert torch.isfinite(loss) and pred.shape == (2, 9, 32 * 32 * 3) and mask.sum() == 2 * 7
    enc = model.encoder
    for p in (enc.patch_embeds[0].proj.weight, enc.patch_embeds[1].proj.weight, enc.pos_block[0].proj[0].weight,
              enc.blocks[0][1].attn.sr.weight, enc.blocks[0][0].attn.qkv.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["greenmim", "simmim"])
def test_grad_checkpointing_matches(method):
    cfg = dict(SVT)
    name = cfg.pop("name")
    torch.manual_seed(0)
    model = create_pretrain_model(name, method=method, sparse_backend="native", decoder_dim=32, decoder_heads=2, **cfg)
    images = torch.randn(2, 3, 96, 96)
    mask = random_mask(2, 9, 0.75, generator=torch.Generator().manual_seed(0))
    grads = []
    for enable in (False, True):
        model.encoder.set_grad_checkpointing(enable)
        model.zero_grad()
        model(images, mask=mask)[0].backward()
        grads.append(model.encoder.patch_embeds[0].proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_clear_errors():
    cfg = dict(SVT)
    name = cfg.pop("name")
    with pytest.raises(ValueError, match="LSA window"):
        create_encoder(name, **dict(cfg, wss=(5, 5, 5, 5)))
    with pytest.raises(ValueError, match="sr_ratio"):
        create_encoder(name, **dict(cfg, sr_ratios=(8, 8, 2, 1)))
    with pytest.raises(ValueError, match="sparse_backend"):
        create_encoder(name, sparse_backend="gpu", **cfg)
    enc = create_encoder(name, sparse_backend="native", **cfg)
    with pytest.raises(ValueError, match="img_size=128"):
        enc(torch.randn(1, 3, 128, 128), torch.zeros(1, 16, dtype=torch.bool))
