"""PVTv2 through the command-line tools on a tiny model (in process): greenmim-pretrain with an exact
resume, then the checkpoint into greenmim-finetune (fine-tune, k-NN, linear probe), greenmim-export
(loads into timm's PVTv2, which takes no img_size) and greenmim-detect (FPN on the four stages,
layer decay); the trainer's compiled step (static plans: nothing recompiles)."""
import json
import sys

import pytest
import timm
import torch

from finetune_helpers import compose, read_jsonl
from test_compiled_step import eager_backend  # noqa: F401  (fixture)

MODEL = ["model=greenmim_pvt_v2_b0", "model.encoder_args.embed_dims=[16,16,32,32]", "model.encoder_args.depths=[1,1,1,1]",
         "model.encoder_args.num_heads=[1,1,2,2]"]
TINY_KW = dict(embed_dims=(16, 16, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
PRETRAIN = MODEL + ["model.decoder_dim=32", "model.decoder_heads=2", "data=synthetic", "data.num_samples=8", "data.img_size=64",
                    "data.batch_size=4", "data.num_workers=0", "trainer.max_steps=4", "trainer.log_every=1",
                    "trainer.tensorboard=false", "vis.every_epochs=0"]


def pretrain(monkeypatch, out, *args):
    from greenmim.cli.pretrain import main

    monkeypatch.setattr(sys, "argv", ["greenmim-pretrain", *PRETRAIN, f"output_dir={out}", *args])
    main()
    return {r["step"]: r["train/loss"] for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(the uninterrupted run's losses, its last checkpoint, the run dir)."""
    mp = pytest.MonkeyPatch()
    try:
        out = tmp_path_factory.mktemp("pvt_pre")
        losses = pretrain(mp, out)
    finally:
        mp.undo()
    return losses, out / "checkpoints" / "step-00000004.pt", out


def test_pretrain_resumes_exactly(checkpoint, monkeypatch, tmp_path):
    losses, ckpt, _ = checkpoint
    assert sorted(losses) == [1, 2, 3, 4] and all(v == v for v in losses.values())
    pretrain(monkeypatch, tmp_path, "trainer.stop_at_step=2")
    assert pretrain(monkeypatch, tmp_path, "resume=auto") == losses  # steps 3-4 after the resume, as uninterrupted


def test_finetune_evaluate_and_export(checkpoint, folders, tmp_path):
    from greenmim.cli.export import export_encoder
    from greenmim.cli.finetune import run

    _, ckpt, _ = checkpoint
    common = [f"data.root={folders}", f"pretrained={ckpt}", "data.img_size=64", "data.num_workers=0", *MODEL]
    res = run(compose("experiment=finetune_quick", f"output_dir={tmp_path / 'ft'}", "trainer.epochs=1", "data.batch_size=6", *common))
    report = json.loads((tmp_path / "ft" / "results.json").read_text())["load_report"]
    assert report["kind"] == "greenmim-pretrain" and report["missing"] == ["head.weight", "head.bias"] and "acc1" in res["best"]
    for exp, extra in (("knn", []), ("linear_probe", ["probe.epochs=1", "probe.batch_size=8"])):
        res = run(compose(f"experiment={exp}", f"output_dir={tmp_path / exp}", *extra, *common))
        assert 0.0 <= res["metrics"]["acc1"] <= 100.0, exp

    path, info = export_encoder(str(ckpt), str(tmp_path / "pvt.safetensors"))
    assert info["timm_name"] == "pvt_v2_b0" and "img_size" not in info["model_args"]
    model = timm.create_model("pvt_v2_b0", pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(file=str(path)),
                              **{k: tuple(v) for k, v in info["model_args"].items()})
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    torch.testing.assert_close(model.stages[2].blocks[0].mlp.dwconv.weight, state["encoder.stages.2.blocks.0.mlp.dwconv.weight"])


def test_detect_from_the_pretrained_checkpoint(checkpoint, tmp_path):
    from greenmim.cli.detect import run
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    _, ckpt, _ = checkpoint
    args = ["experiment=detect_quick", *MODEL, f"pretrained={ckpt}", "data.synthetic.num_train=2", "data.synthetic.num_val=2",
            "data.synthetic.size=[96,128]", "data.min_size=[96]", "data.max_size=160", "detector.fpn_channels=16",
            "trainer.max_steps=2", "trainer.log_every=1", "trainer.tensorboard=false", "sched.warmup_steps=1",
            "optim.layer_decay=0.9", f"output_dir={tmp_path}"]
    with initialize_config_module("greenmim.configs", version_base=None):
        cfg = hydra_compose("detect", overrides=args)
    metrics = run(cfg)
    assert -1.0 <= metrics["bbox_AP"] <= 1.0 and (tmp_path / "checkpoints" / "step-00000002.pt").is_file()


def test_compiled_step_equals_eager_and_never_recompiles(eager_backend):  # noqa: F811
    """The trainer's compiled step (dynamo's eager backend: the same capture and guards) on static plans."""
    from greenmim.plan.collate import MIMBatch, planner_for
    from greenmim.tasks.pretrain.loss import pretrain_loss
    from greenmim.engine import Precision, TrainingStep, build_optimizer
    from greenmim.engine.step import compile_counters
    from greenmim.plan.masking import seeded_masks
    from greenmim.models import create_pretrain_model

    torch.manual_seed(0)
    models = [create_pretrain_model("pvt_v2_b0", img_size=64, decoder_dim=32, decoder_heads=2, **TINY_KW) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    planner = planner_for(models[0], torch.device("cpu"), static=True)
    gen = torch.Generator().manual_seed(0)
    data = [MIMBatch(torch.randint(0, 256, (2, 3, 64, 64), generator=gen, dtype=torch.uint8),
                     planner.plan(seeded_masks([2 * i, 2 * i + 1], 4, 0.75)).to("cpu")) for i in range(3)]
    assert len({str(b.plan.host.vis_idx.tolist()) for b in data}) > 1  # different masks
    steps = [TrainingStep(m, build_optimizer(m, 1e-3), Precision("fp32", torch.device("cpu")), clip_grad=1.0, compile_mode=mode)
             for m, mode in zip(models, (None, "default"))]
    for i, batch in enumerate(data):
        losses = []
        for step in steps:
            losses.append(step([batch], lambda model, b: (pretrain_loss(model, b, torch.device("cpu")), {})).loss)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        if i == 0:
            warm = compile_counters()
    assert warm["graphs"] >= 1 and compile_counters()["graphs"] == warm["graphs"]  # no recompile over other masks
