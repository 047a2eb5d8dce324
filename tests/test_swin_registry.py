"""greenmim's hand-written Swin architecture table (``SWIN_ARCHS``) against timm's own entrypoints.

Models are built with ``pretrained=False`` on the meta device: structure and shapes only, no download,
no memory. (Twins has the same check in tests/test_twins.py.)"""
import pytest
import timm
import torch

from greenmim.models import create_encoder, list_encoders
from greenmim.models.swin import SWIN_ARCHS


def arch(model) -> dict:
    """The constructor arguments of a timm Swin (v1), read back from the built model."""
    return dict(
        img_size=tuple(model.patch_embed.img_size),
        patch_size=tuple(model.patch_embed.patch_size),
        window_size=tuple(model.layers[0].blocks[0].window_size),  # later stages may clamp to their grid
        embed_dim=model.embed_dim,
        depths=tuple(len(stage.blocks) for stage in model.layers),
        num_heads=tuple(stage.blocks[0].attn.num_heads for stage in model.layers),
    )


def as_pairs(args: dict) -> dict:
    out = dict(args)
    for key in ("img_size", "patch_size", "window_size"):
        value = out[key]
        out[key] = tuple(value) if isinstance(value, (list, tuple)) else (value, value)
    out["depths"], out["num_heads"] = tuple(out["depths"]), tuple(out["num_heads"])
    return out


def test_registry_lists_exactly_the_table():
    assert list_encoders("swin") == sorted(SWIN_ARCHS)
    assert all(name in timm.list_models("swin_*") for name in SWIN_ARCHS)


@pytest.mark.parametrize("name", sorted(SWIN_ARCHS))
def test_table_matches_timm_entrypoint(name):
    ref = timm.create_model(name, pretrained=False, device="meta")
    assert as_pairs(SWIN_ARCHS[name]) == arch(ref), name
    for method in ("greenmim", "simmim"):
        ours = create_encoder(name, method=method, device="meta")
        assert arch(ours) == arch(ref), (name, method)
        shapes = {k: v.shape for k, v in ref.state_dict().items() if not k.startswith("head.")}
        ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
        assert ours_shapes == shapes, (name, method)
        assert ours.unit == 32 and ours.num_features == ref.num_features
        assert all(p.device == torch.device("meta") for p in ours.parameters())
