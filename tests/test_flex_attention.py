"""``attention="flex"``: FlexAttention reads Swin's relative-position bias from its table in the kernel
(``score_mod``) and keeps windows apart with ``mask_mod``. It must equal the SDPA path in values and in
the gradient of every parameter (fp32, CPU), compile without recompiles, and be accepted wherever a
model is configured.

On the CPU FlexAttention runs torch's unfused reference implementation, which is slow: the models
here are tiny (few blocks, small images).
"""
import pytest
import torch

from conftest import SWIN_NAME
from greenmim.plan.collate import MIMBatch, planner_for
from greenmim.tasks.pretrain.loss import pretrain_loss
from greenmim.engine.step import compile_counters
from greenmim.plan.masking import random_mask, seeded_masks, unit_grid
from greenmim.models import check_architecture, create_encoder, create_pretrain_model
from greenmim.ops.group_attention import GroupLayout, group_window_attention
from greenmim.plan.slots import plan_group_slots
from greenmim.plan.windows import stage_windows

# 128 px: a 4x4 unit grid; window 4 tiles every stage; stage 1 has a shifted block
SWIN = dict(img_size=128, window_size=4, embed_dim=16, depths=(2, 1, 1, 1), num_heads=(2, 2, 2, 4))
TWINS = dict(img_size=96, embed_dims=(16, 16, 16, 16), num_heads=(2, 1, 1, 1), mlp_ratios=(1, 1, 1, 1),
             depths=(2, 1, 1, 1), wss=(3, 3, 3, 3), sr_ratios=(4, 2, 1, 1))
# Swin V2: 96 px, a 3x3 unit grid, window 3 tiles every stage; its bias comes from the CPB MLP, its
# scores are cosine similarities with a learnt logit scale
SWINV2 = dict(img_size=96, window_size=3, embed_dim=16, depths=(2, 1, 1, 1), num_heads=(2, 2, 2, 4))
MODELS = {"swin": (SWIN_NAME, SWIN), "twins": ("twins_svt_small", TWINS), "swinv2": ("swinv2_tiny_window8_256", SWINV2)}


def encoder_pair(kind):
    """(sdpa encoder, flex encoder) with the same weights, in training mode without stochastic depth."""
    name, cfg = MODELS[kind]
    torch.manual_seed(0)
    sdpa = create_encoder(name, drop_path_rate=0.0, **cfg)
    flex = create_encoder(name, attention="flex", drop_path_rate=0.0, **cfg)
    flex.load_state_dict(sdpa.state_dict())
    with torch.no_grad():  # a random table: the zero-initialised default would hide a wrong row
        for table in (m.relative_position_bias_table for m in sdpa.modules() if hasattr(m, "relative_position_bias_table")):
            table.normal_()
    flex.load_state_dict(sdpa.state_dict())
    return sdpa, flex


def forward_backward(enc, images, plan, weight):
    enc.zero_grad(set_to_none=True)
    out = enc(images, plan=plan)
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad for n, p in enc.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind,shared,static", [("swin", False, False), ("swin", True, True), ("twins", False, True),
                                                ("swinv2", False, False)])
def test_flex_equals_sdpa_values_and_every_gradient(kind, shared, static):
    sdpa, flex = encoder_pair(kind)
    h, w = sdpa.patch_embed.img_size
    grid = unit_grid((h, w), sdpa.unit)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, h, w, generator=gen)
    mask = random_mask(3, grid.num_units, 0.75, shared=shared, generator=gen)
    # group sizes in multiples of 8 (as on CUDA): padding slots in every plan
    plans = [enc.planner(group_multiple=8, static=static, shared_mask=shared).plan(mask) for enc in (sdpa, flex)]
    assert plans[1].attention == "flex" and plans[0].attention == "sdpa"
    assert any(s.num_slots > s.tokens for stage in plans[1].layouts for s in stage.values()), "padding slots are exercised"
    assert all(lay.rel_index is None and lay.window_mask is None for stage in plans[1].to("cpu").layouts for lay in stage.values())
    weight = torch.randn(3, (~mask[0]).sum(), sdpa.num_features, generator=gen)
    out_s, grads_s = forward_backward(sdpa, images, plans[0], weight)
    out_f, grads_f = forward_backward(flex, images, plans[1], weight)
    torch.testing.assert_close(out_f, out_s, atol=2e-5, rtol=1e-4)
    assert grads_f.keys() == grads_s.keys() == {n for n, _ in sdpa.named_parameters()}
    tables = [n for n in grads_s if "relative_position_bias_table" in n]
    assert (kind == "swin") == bool(tables) and all(grads_s[n].abs().sum() > 0 for n in tables)
    for name, grad in grads_s.items():
        torch.testing.assert_close(grads_f[name], grad, atol=1e-5 * float(grad.abs().max()) + 1e-7, rtol=1e-4, msg=name)


def test_flex_group_attention_equals_sdpa_with_windows_shared_by_groups():
    """One layer, several windows (and samples) per group, shifted partition, padding: the table
    gradient of the in-kernel bias equals the gathered bias's."""
    from greenmim.plan.grouping import CostModel

    mask = random_mask(3, 49, 0.5, generator=torch.Generator().manual_seed(2)).numpy()
    slots = plan_group_slots(stage_windows(mask, (7, 7), 2, 7, 3), CostModel(a=1.0, b=500.0), pad_groups_to=4)  # 14x14 grid
    assert slots.num_slots > slots.tokens
    torch.manual_seed(0)
    qkv, proj = torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)
    x = torch.randn(slots.tokens, 16)
    results = []
    for attention in ("sdpa", "flex"):
        table = torch.randn(169, 2, generator=torch.Generator().manual_seed(3)).requires_grad_()
        xg = x.clone().requires_grad_()
        layout = GroupLayout.from_slots(slots, torch.device("cpu"), attention=attention)
        out = group_window_attention(xg, layout, qkv, proj, 2, table, attention=attention)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), xg.grad, table.grad))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="derived for attention='flex'"):
        group_window_attention(x, GroupLayout.from_slots(slots, torch.device("cpu"), attention="flex"), qkv, proj, 2, table)
    with pytest.raises(ValueError, match="no attention dropout"):
        group_window_attention(x, layout, qkv, proj, 2, table, attn_drop=0.1, attention="flex")


@pytest.fixture
def eager_backend(monkeypatch):
    """``torch.compile`` with dynamo's ``eager`` backend: dynamo's capture, guards and recompiles, no
    codegen (a CPU inductor compile of FlexAttention's backward is not available)."""
    original = torch.compile

    def compile_eagerly(model, mode=None, dynamic=None, **_):
        return original(model, backend="eager", dynamic=dynamic)

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_flex_compiled_step_never_recompiles(eager_backend):
    from greenmim.engine import compile_model

    torch.manual_seed(0)
    cfg = dict(SWIN, depths=(1, 1, 1, 1))
    model = create_pretrain_model(SWIN_NAME, attention="flex", decoder_dim=16, decoder_heads=1, **cfg)
    planner = planner_for(model, torch.device("cpu"), static=True)
    grid = unit_grid(cfg["img_size"], model.unit)
    gen = torch.Generator().manual_seed(0)
    data = [MIMBatch(torch.randint(0, 256, (2, 3, 128, 128), generator=gen, dtype=torch.uint8),
                     planner.plan(seeded_masks([10 * i, 10 * i + 1], grid.num_units, 0.75)).to("cpu")) for i in range(2)]
    compiled = compile_model(model, "default")
    before = compile_counters()
    with torch._dynamo.config.patch(error_on_recompile=True):
        pretrain_loss(compiled, data[0], torch.device("cpu")).backward()
        warm = compile_counters()
        # the plan's resolution runs eagerly: the same one break as with SDPA, none inside the attention
        assert warm["graph_breaks"] - before["graph_breaks"] == 1
        pretrain_loss(compiled, data[1], torch.device("cpu")).backward()  # other masks, same static shapes
    assert warm["graphs"] > before["graphs"] and compile_counters()["graphs"] == warm["graphs"]
    assert model.encoder.layers[0].blocks[0].attn.relative_position_bias_table.grad.abs().sum() > 0


def test_attention_option_is_accepted_where_models_are_configured():
    check_architecture(SWIN_NAME, {"attention": "flex"})
    check_architecture("twins_svt_small", {"attention": None})
    with pytest.raises(ValueError, match="model.encoder_args.attention='fast' is invalid: choose one of sdpa, flex"):
        check_architecture(SWIN_NAME, {"attention": "fast"})
    with pytest.raises(ValueError, match="attention must be one of sdpa, flex"):
        create_encoder(SWIN_NAME, attention="fast", **SWIN)
    assert create_encoder(SWIN_NAME, attention="flex", **SWIN).planner().attention == "flex"
    baseline = create_encoder(SWIN_NAME, method="simmim", attention="flex", **SWIN)  # the all-token encoder ignores it
    assert not baseline.visible_only
