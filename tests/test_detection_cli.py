"""greenmim-detect end to end on generated COCO-format data: train, evaluate, eval_only, errors, DDP gathering."""
import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_module

from greenmim.cli.detect import run

TINY_RUN = [
    "experiment=detect_quick",
    "data.synthetic.num_train=4",
    "data.synthetic.num_val=3",
    "data.synthetic.size=[96,128]",
    "data.min_size=[96]",
    "data.max_size=160",
    "model.encoder_args.depths=[1,1,1,1]",
    "detector.fpn_channels=32",
    "trainer.max_steps=3",
    "trainer.log_every=1",
    "trainer.tensorboard=false",
    "sched.warmup_steps=1",
]


def compose_cfg(overrides):
    with initialize_config_module("greenmim.configs", version_base=None):
        return compose("detect", overrides=overrides)


def test_configs_compose():
    for exp, epochs, sizes, steps in (("detect_coco_1x", 12, [800], [8, 11]), ("detect_coco_3x", 36, list(range(480, 801, 32)), [27, 33])):
        cfg = compose_cfg([f"experiment={exp}"])
        assert cfg.trainer.epochs == epochs and list(cfg.data.min_size) == sizes and cfg.data.max_size == 1333
        assert list(cfg.sched.milestones_epochs) == steps and cfg.sched.name == "step"
        assert cfg.optim.blr == 1e-4 and cfg.optim.base_batch == 16 and cfg.optim.weight_decay == 0.05
        assert cfg.model.name == "swin_base_patch4_window7_224" and cfg.model.drop_path_rate == 0.3
    quick = compose_cfg(["experiment=detect_quick"])  # the demo runs only when named
    assert quick.data.name == "coco_synthetic" and quick.model.encoder_args.embed_dim == 32


def train_losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_train_evaluate_resume_and_eval_only(tmp_path):
    out = tmp_path / "run"
    metrics = run(compose_cfg(TINY_RUN + [f"output_dir={out}"]))
    for t in ("bbox", "segm"):
        for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            assert f"{t}_{k}" in metrics and -1.0 <= metrics[f"{t}_{k}"] <= 1.0
    assert json.loads((out / "coco_metrics.json").read_text()) == metrics
    assert (out / "checkpoints" / "step-00000003.pt").is_file()
    assert (out / "val_results_bbox.json").is_file() and (out / "val_results_segm.json").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss_mask" in r for r in rows) and any("epoch/bbox_AP" in r for r in rows)

    # stopped after step 2, continued with resume=auto: the same losses and the same AP, bit for bit
    part = tmp_path / "part"
    assert run(compose_cfg(TINY_RUN + [f"output_dir={part}", "trainer.stop_at_step=2"])) == {}
    resumed = run(compose_cfg(TINY_RUN + [f"output_dir={part}", "resume=auto"]))
    assert train_losses(part) == train_losses(out) and len(train_losses(out)) == 3
    assert resumed == metrics

    again = run(compose_cfg(TINY_RUN + [f"output_dir={out}", "eval_only=true"]))  # latest checkpoint in output_dir
    assert again == pytest.approx(metrics)
    assert (out / "eval_results_segm.json").is_file()


def test_cli_reports_a_missing_annotation_file_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "greenmim.cli.detect", "~experiment", "data=coco", f"data.root={tmp_path}/coco",
           f"output_dir={tmp_path}/out"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "lacks the expected COCO files" in err[0] and "data.root=" in err[0]
    assert "train2017" in err[0] and "instances_val2017.json" in err[0]  # every missing file is named


def _gather_worker(rank, world, init_file, img_dir, ann, queue):
    from greenmim.tasks.detect import CocoDetection, CocoEvaluator, ground_truth_as_predictions

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ds = CocoDetection(img_dir, ann, train=False, filter_empty=False)
        ev = CocoEvaluator(ds.coco, ds.label_to_cat)
        for i in range(rank, len(ds), world):  # each rank sees its own shard only
            ev.update([ground_truth_as_predictions(ds, i)], [ds.ids[i]])
        merged = ev.synchronize()
        metrics = ev.evaluate()
        queue.put((rank, sorted(merged) == sorted(ds.ids), metrics))
    finally:
        dist.destroy_process_group()


def test_predictions_are_gathered_over_ranks(tmp_path):
    from greenmim.tasks.detect.synthetic import write_synthetic_coco

    img_dir, ann = write_synthetic_coco(str(tmp_path / "coco"), num_images=4, size=(64, 80), seed=1)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, str(tmp_path / "store"), img_dir, ann, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (complete, m)) for r, complete, m in (queue.get(timeout=180) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    assert all(complete for complete, _ in results.values())
    assert results[0][1]["segm_AP"] == pytest.approx(1.0) and results[1][1] == {}
