"""``trainer.compile=true``: the compiled step equals the eager one, compiles once with static plans,
and keeps timm's checkpoint keys; ``greenmim-bench --compile`` reports eager and compiled ratios.

One test compiles with inductor (a cold CPU compile of this tiny Swin takes minutes on 2 busy cores,
a warm cache ~10 s); the others check the plumbing with dynamo's ``eager`` backend (graph capture,
guards and recompiles are dynamo's, whatever the backend), which takes seconds.
"""
import copy
import json
import sys

import pytest
import torch

from conftest import TINY_PRETRAIN_ARGS
from greenmim.plan.collate import MIMBatch, plan_masks, planner_for
from greenmim.tasks.pretrain.loss import pretrain_loss
from greenmim.data.transforms import normalize
from greenmim.engine import Precision, TrainingStep, build_optimizer, compile_model, load_checkpoint
from greenmim.engine.step import compile_counters
from greenmim.plan.masking import seeded_masks, unit_grid
from greenmim.models import create_pretrain_model

# 128 px: a 4x4 unit grid (4 visible units at 0.75); window 4 tiles every stage; stage 1 has a shifted block
TINY = dict(img_size=128, window_size=4, embed_dim=16, depths=(2, 1, 1, 1), num_heads=(1, 1, 2, 2), decoder_dim=32, decoder_heads=2)
BATCH = 2


@pytest.fixture
def eager_backend(monkeypatch):
    """``torch.compile`` with dynamo's ``eager`` backend: the same capture, guards and wrapper, no codegen."""
    original = torch.compile

    def compile_eagerly(model, mode=None, dynamic=None, **_):
        return original(model, backend="eager", dynamic=dynamic)

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def batches(model, n, seed=0):
    """``n`` planned batches (static plans, as the trainer plans them when compiling), different masks."""
    planner = planner_for(model, torch.device("cpu"), static=True)
    grid = unit_grid(TINY["img_size"], model.unit)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        mask = seeded_masks([1000 * seed + 10 * i + b for b in range(BATCH)], grid.num_units, 0.75)
        images = torch.randint(0, 256, (BATCH, 3, TINY["img_size"], TINY["img_size"]), generator=gen, dtype=torch.uint8)
        out.append(MIMBatch(images, plan_masks(mask, grid, planner).to("cpu")))
    return out


@pytest.mark.parametrize("method", ["greenmim", "simmim"])
def test_graph_breaks_one_for_greenmim_none_for_simmim(method):
    """greenmim: the plan resolved once, eagerly (``device_plan``): one break; simmim: none, whether
    the plan is the loader's host plan or the prefetcher's device plan (dynamo's counters, as
    ``greenmim-bench --compile`` reports them)."""
    torch.manual_seed(0)
    model = create_pretrain_model("swin_tiny_patch4_window7_224", method=method, **TINY)
    batch = batches(model, 1)[0]
    images = normalize(batch.images)
    for plan in (batch.plan.host, batch.plan):  # HostPlan, DevicePlan
        torch._dynamo.reset()
        before = compile_counters()
        torch.compile(model, backend="eager", dynamic=False)(images, plan=plan)
        after = compile_counters()
        assert after["graphs"] > before["graphs"]  # it did compile
        assert after["graph_breaks"] - before["graph_breaks"] == (1 if method == "greenmim" else 0), type(plan).__name__
    torch._dynamo.reset()


def step_of(model, compiled):
    optimizer = build_optimizer(model, 1e-3)
    called = compile_model(model, "default") if compiled else model
    return TrainingStep(called, optimizer, Precision("fp32", torch.device("cpu")), clip_grad=1.0)


def test_compiled_step_equals_eager_and_never_recompiles():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager_model = create_pretrain_model("swin_tiny_patch4_window7_224", **TINY)
    compiled_model = copy.deepcopy(eager_model)
    data = batches(eager_model, 6)
    eager, compiled = step_of(eager_model, False), step_of(compiled_model, True)
    shapes = {tuple((s.num_groups, s.group_size) for st in b.plan.host.layouts for s in st.values()) for b in data}
    assert len(shapes) == 1, shapes  # static plans: one shape over different masks

    def run(step, batch):
        grads = {}  # the gradients the optimizer step is about to apply
        hook = step.optimizer.register_step_pre_hook(lambda *_: grads.update(
            {n: p.grad.clone() for n, p in step.model.named_parameters() if p.grad is not None}))
        out = step([batch], lambda model, b: (pretrain_loss(model, b, torch.device("cpu")), {}))
        hook.remove()
        assert grads and not bool(out.skipped)
        return out.loss, grads

    before = compile_counters()
    for i, batch in enumerate(data):
        loss_e, grads_e = run(eager, batch)
        loss_c, grads_c = run(compiled, batch)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
        assert {n.replace("_orig_mod.", "") for n in grads_c} == set(grads_e)
        for name, grad in grads_c.items():
            torch.testing.assert_close(grad, grads_e[name.replace("_orig_mod.", "")], rtol=1e-3, atol=1e-5)
        if i == 0:
            warm = compile_counters()
    after = compile_counters()
    assert warm["graphs"] > before["graphs"]  # it did compile
    assert after["graphs"] == warm["graphs"]  # and never again over 5 batches of other masks
    # 6 AdamW steps later. Adam's update m/sqrt(v) is ~lr in size even for gradients at rounding level, so
    # fp differences of such elements (seen: 2.3e-5 on a cold inductor cache) are bounded by lr, not by
    # the gradient tolerance: allow a tenth of one step (lr 1e-3); a wrong step moves weights by ~lr.
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


def run_pretrain(monkeypatch, out, *args):
    from greenmim.cli.pretrain import main

    monkeypatch.setattr(sys, "argv", ["greenmim-pretrain", *TINY_PRETRAIN_ARGS, "data.num_workers=0", "data=synthetic",
                                      "data.num_samples=8", "trainer.max_steps=3", "vis.every_epochs=0",
                                      "trainer.tensorboard=false", f"output_dir={out}", *args])
    main()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["train/loss"] for row in rows if "train/loss" in row]


def test_trainer_compile_keeps_clean_keys_and_eager_losses(monkeypatch, tmp_path, eager_backend):
    eager_losses = run_pretrain(monkeypatch, tmp_path / "eager")
    compiled_losses = run_pretrain(monkeypatch, tmp_path / "compiled", "trainer.compile=true")
    assert len(compiled_losses) == len(eager_losses) >= 3
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    ckpt = load_checkpoint(next((tmp_path / "compiled" / "checkpoints").glob("step-*.pt")), map_location="cpu")
    keys = list(ckpt["model"])
    assert keys and not any("_orig_mod" in k for k in keys)
    assert any(k.startswith("encoder.layers.0.blocks.0.attn.") for k in keys)  # timm's names under the encoder


def test_trainer_refuses_an_unknown_compile_mode(monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_pretrain(monkeypatch, tmp_path / "bad", "trainer.compile=true", "trainer.compile_mode=fastest")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainer.compile_mode must be one of auto" in err[0]
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_bench_compile_reports_eager_and_compiled_ratios(tmp_path, capsys, eager_backend):
    from greenmim.cli.bench import main

    threads = torch.get_num_threads()
    args = ["--embed-dim", "16", "--depths", "1,1,1,1", "--num-heads", "1,1,2,2", "--override", "decoder_dim=32",
            "--override", "decoder_heads=2", "--img-size", "128", "--window-size", "4", "--batch-size", "2", "--device", "cpu",
            "--threads", "1", "--no-flops", "--no-memory", "--plan-workers", "0", "--warmup", "1", "--iters", "2", "--compile", "--out", str(tmp_path / "b")]
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    assert "torch.compile (the trainer's step)" in stdout and "speedup compiled" in stdout
    c = json.loads((tmp_path / "b.json").read_text())["compile"]
    for method in ("greenmim", "simmim"):
        assert "error" not in c[method], c[method]
        assert c[method]["mode"] == "default" and c[method]["graphs"] >= 1 and c[method]["img_per_s"] > 0
    assert c["speedup"] > 0 and c["speedup_eager"] > 0
    assert c["greenmim"]["graph_breaks"] == 1 and c["simmim"]["graph_breaks"] == 0  # the eager plan resolution only
    assert c["graphs_after_warmup"] == 0  # static plans: nothing recompiles while timed
