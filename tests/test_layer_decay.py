"""Layer-wise lr decay: every Swin/Twins/PVTv2 parameter sits at the right depth (SimMIM's rule in timm's layout)."""
import pytest
import timm
import torch

from greenmim.engine.optim import build_optimizer
from greenmim.engine.schedule import apply_lr
from greenmim.weights.layer_decay import layer_map, param_groups_layer_decay

DEPTHS = (2, 2, 2, 2)  # L = 8 blocks: depths 0 (stem) .. 9 (norm + head)


def swin():
    return timm.create_model("swin_tiny_patch4_window7_224", num_classes=3, img_size=64, embed_dim=16, depths=DEPTHS, num_heads=(1, 1, 2, 2), window_size=2)


def twins():
    return timm.create_model(
        "twins_svt_small", num_classes=3, img_size=64, embed_dims=(16, 16, 32, 32), depths=DEPTHS, num_heads=(1, 1, 2, 2), wss=(2, 2, 2, 2)
    )


def pvt_v2():
    return timm.create_model("pvt_v2_b0", num_classes=3, embed_dims=(16, 16, 32, 32), depths=DEPTHS, num_heads=(1, 1, 2, 2))


def expected_swin(name):
    parts = name.split(".")
    if parts[0] == "patch_embed":
        return 0
    if parts[0] in ("norm", "head"):
        return 9
    stage = int(parts[1])
    if parts[2] == "blocks":  # block j of stage i: 2*i + j + 1
        return 2 * stage + int(parts[3]) + 1
    assert parts[2] == "downsample" and stage > 0  # merges the output of stage i-1's last block
    return 2 * stage


def expected_twins(name):
    parts = name.split(".")
    if parts[0] in ("norm", "head"):
        return 9
    stage = int(parts[1])
    if parts[0] == "patch_embeds":
        return 2 * stage  # 0 for the stem
    if parts[0] == "blocks":
        return 2 * stage + int(parts[2]) + 1
    assert parts[0] == "pos_block"  # PEG after block 0 of the stage
    return 2 * stage + 1


def expected_pvt_v2(name):
    parts = name.split(".")
    if parts[0] == "patch_embed":
        return 0
    if parts[0] == "head":
        return 9
    stage = int(parts[1])
    if parts[2] == "blocks":
        return 2 * stage + int(parts[3]) + 1
    if parts[2] == "norm":  # after the stage's last block; the last stage's norm is the final norm
        return 9 if stage == 3 else 2 * stage + 2
    assert parts[2] == "downsample" and stage > 0
    return 2 * stage


@pytest.mark.parametrize("build,expected", [(swin, expected_swin), (twins, expected_twins), (pvt_v2, expected_pvt_v2)],
                         ids=["swin", "twins", "pvt_v2"])
def test_every_parameter_at_its_depth(build, expected):
    model = build()
    depths = layer_map(model)
    assert set(depths) == {n for n, _ in model.named_parameters()}
    for name, d in depths.items():
        assert d == expected(name), name
    assert sorted(set(depths.values())) == list(range(10))


@pytest.mark.parametrize("build", [swin, twins], ids=["swin", "twins"])
def test_groups_scales_and_weight_decay(build):
    model = build()
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.8)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert len(by_param) == sum(1 for _ in model.parameters())
    depths = layer_map(model)
    nwd = set(model.no_weight_decay())
    for name, p in model.named_parameters():
        g = by_param[id(p)]
        assert g["lr_scale"] == pytest.approx(0.8 ** (9 - depths[name]))
        assert g["weight_decay"] == (0.0 if p.ndim <= 1 or name in nwd else 0.05), name
    if build is swin:
        table = "layers.0.blocks.0.attn.relative_position_bias_table"
        assert by_param[id(dict(model.named_parameters())[table])]["weight_decay"] == 0.0


def test_engine_optimizer_applies_scales():
    model = swin()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), param_groups=param_groups_layer_decay(model, 0.05, 0.9))
    apply_lr(opt, 1e-3, 0.5)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.5e-3 * g["lr_scale"])
    head = [g for g in opt.param_groups if any(p is model.head.fc.weight for p in g["params"])][0]
    stem = [g for g in opt.param_groups if any(p is model.patch_embed.proj.weight for p in g["params"])][0]
    assert head["lr_scale"] == 1.0 and stem["lr_scale"] == pytest.approx(0.9**9)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()
