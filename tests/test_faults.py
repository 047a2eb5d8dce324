"""Faults and safety (issue 11): nothing lost, nothing written where it should not be, every bad value
one line naming the fix with a non-zero exit. One test (or group) per numbered item of the issue."""
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_module

from cli_helpers import assert_one_line, run_cli
from greenmim.tasks.detect.data import CocoDetection, CocoFormatError
from greenmim.tasks.detect.synthetic import write_synthetic_coco
from greenmim.engine import CheckpointManager, OptimConfig, Trainer, TrainerConfig, TrainTask, UserError
from greenmim.engine.sampler import ResumableDistributedSampler

# a micro Swin at 64 px (4 units of 32 px), 12 synthetic images of batch 4: 3 steps per epoch
TINY = [
    "model=greenmim_swin_micro", "model.encoder_args.embed_dim=16", "model.encoder_args.depths=[1,1,1,1]",
    "model.encoder_args.num_heads=[1,1,2,2]", "model.decoder_dim=32", "model.decoder_heads=2",
    "data=synthetic", "data.num_samples=12", "data.img_size=64", "data.batch_size=4", "data.num_workers=0",
    "trainer.log_every=1", "trainer.tensorboard=false", "vis.every_epochs=0",
]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def pretrain_cmd(*args):
    return [sys.executable, "-m", "greenmim.cli.pretrain", *TINY, *args]


def train_losses(out: Path):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def snapshot(root: Path):
    """Every file under ``root`` with the SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """An uninterrupted 3-epoch pretraining run (9 steps)."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    proc = subprocess.run(pretrain_cmd("trainer.epochs=3", f"output_dir={out}"), capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(train_losses(out)) == list(range(1, 10))
    return out


# ------------------------------------------------------------------ 1. synthetic data never goes into a user's data root
def make_coco_root(root: Path) -> Path:
    """A user's COCO-layout folder (train2017/, val2017/, annotations/) holding a 2-point polygon in
    val and an odd-length polygon in train, the malformed shapes pycocotools crashes on."""
    for split, n, seed in (("train2017", 3, 0), ("val2017", 2, 1)):
        write_synthetic_coco(str(root), n, (96, 128), split=split, seed=seed, with_rle=False, with_crowd=False)
    for split, poly in (("val2017", [10.0, 10.0, 40.0, 40.0]), ("train2017", [10.0, 10.0, 40.0, 10.0, 40.0])):
        ann_file = root / "annotations" / f"instances_{split}.json"
        data = json.loads(ann_file.read_text())
        data["annotations"].append({**data["annotations"][0], "id": 999, "segmentation": [poly]})
        ann_file.write_text(json.dumps(data))
    return root


DETECT_TINY = [
    "model=greenmim_swin_micro", "data.min_size=[96]", "data.max_size=160", "model.encoder_args.depths=[1,1,1,1]", "detector.fpn_channels=32",
    "trainer.max_steps=1", "trainer.log_every=1", "trainer.tensorboard=false", "sched.warmup_steps=1", "data.num_workers=0",
]


def test_detect_leaves_a_given_data_root_byte_identical(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # data=coco's default data.root is the relative data/coco
    root = make_coco_root(tmp_path / "coco")
    before = snapshot(root)
    # the demo experiment with data=coco: its generated data is replaced whole (issue 17), nothing leaks
    with initialize_config_module("greenmim.configs", version_base=None):
        leak = compose("detect", overrides=["experiment=detect_quick", "data=coco", f"data.root={root}"])
    assert leak.data.name == "coco" and leak.data.synthetic is None
    # a synthetic set may not be generated into a folder the user named either
    code, err = run_cli(monkeypatch, capsys, "detect", "greenmim-detect", "data=coco_synthetic", f"data.root={root}",
                        f"output_dir={tmp_path / 'gen'}", *DETECT_TINY)
    assert_one_line(code, err, "greenmim-detect", r"writes generated files only under output_dir")
    # explicit paths with the leaked data.synthetic: refused instead of generating into ./data/coco
    code, err = run_cli(monkeypatch, capsys, "detect", "greenmim-detect", "experiment=detect_quick",
                        f"data.train_images={root / 'train2017'}",
                        f"output_dir={tmp_path / 'paths'}", *DETECT_TINY)
    assert_one_line(code, err, "greenmim-detect", r"data.synthetic generates a dataset but data.train_images names your own files")
    assert snapshot(root) == before and not (tmp_path / "data").exists()

    from greenmim.cli.detect import run

    with initialize_config_module("greenmim.configs", version_base=None):
        cfg = compose("detect", overrides=["data=coco", f"data.root={root}", "data.synthetic=null",
                                           f"output_dir={tmp_path / 'out'}", *DETECT_TINY])
    metrics = run(cfg)  # trains and evaluates on the user's files (bad polygons skipped with a count, item 7)
    assert "segm_AP" in metrics
    assert snapshot(root) == before


def test_a_data_root_lacking_the_coco_files_names_them(tmp_path, monkeypatch, capsys):
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    code, err = run_cli(monkeypatch, capsys, "detect", "greenmim-detect", "data=coco", "data.synthetic=null",
                        f"data.root={tmp_path / 'coco'}", f"output_dir={tmp_path / 'out'}")
    assert_one_line(code, err, "greenmim-detect", r"lacks the expected COCO files: .*instances_train2017.json, .*val2017, .*instances_val2017.json")
    assert "coco/train2017," not in err[0]  # the folder that exists is not listed


# ------------------------------------------------------------------ 2. an evaluation failure never throws the epoch away
class ToyTask(TrainTask):
    """A linear model on 16 random vectors (batch 4); ``evaluate`` raises when ``fail_eval``."""

    def __init__(self, fail_eval=False):
        self.fail_eval = fail_eval

    def build_model(self):
        return nn.Linear(4, 1)

    def build_train_loader(self, dist, seed):
        data = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=torch.Generator().manual_seed(1)))
        sampler = ResumableDistributedSampler(16, dist.world_size, dist.rank, shuffle=True, seed=seed)
        return torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)

    def training_step(self, model, batch, trainer):
        return model(batch[0]).pow(2).mean(), {}

    def evaluate(self, model, trainer):
        if self.fail_eval:
            raise OSError("unreadable validation image val/0.jpg")
        return {"val": 1.0}


def toy_trainer(out, task=None, **kw):
    cfg = TrainerConfig.from_yaml(**{**dict(output_dir=str(out), epochs=2, device="cpu", tensorboard=False, log_every=100), **kw})
    return Trainer(task or ToyTask(), cfg, OptimConfig.from_yaml(), sched={"name": "cosine", "warmup_epochs": 0})


def test_a_failing_evaluation_keeps_the_epochs_checkpoint(tmp_path):
    with pytest.raises(OSError, match="unreadable validation image"):
        toy_trainer(tmp_path, ToyTask(fail_eval=True)).fit()
    ckpt = torch.load(tmp_path / "checkpoints" / "step-00000004.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]) == (1, 0, 4)  # the epoch is done and saved
    resumed = toy_trainer(tmp_path, resume="auto")
    resumed.fit()
    assert resumed.step == 8


def test_a_bad_validation_image_fails_before_training_with_a_fix_that_applies(tmp_path, monkeypatch, capsys):
    from finetune_helpers import make_folders

    root = make_folders(tmp_path / "cls", per_class=(4, 2))
    (root / "val" / "class1" / "0.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "out"
    code, err = run_cli(monkeypatch, capsys, "finetune", "greenmim-finetune", "experiment=finetune_quick", f"data.root={root}",
                        f"output_dir={out}", "data.img_size=64", "data.batch_size=4", "data.num_workers=0")
    assert_one_line(code, err, "greenmim-finetune", r"1 unreadable validation image\(s\), e.g. .*class1/0.jpg")
    assert "never skipped" in err[0] and "on_corrupt" not in err[0]
    assert not (out / "checkpoints").exists()


# ------------------------------------------------------------------ 3. one run per directory
def test_a_new_run_into_another_runs_directory_is_refused(baseline, monkeypatch, capsys):
    before = snapshot(baseline)
    code, err = run_cli(monkeypatch, capsys, "pretrain", "greenmim-pretrain", *TINY, f"output_dir={baseline}")
    assert_one_line(code, err, "greenmim-pretrain", r"already holds checkpoints of another run \(newest step-00000009.pt\): "
                                                    r"continue it with resume=auto, or choose a fresh output_dir=")
    code, err = run_cli(monkeypatch, capsys, "pretrain", "greenmim-pretrain", *TINY, f"output_dir={baseline}", "data.batch_size=0")
    assert_one_line(code, err, "greenmim-pretrain", r"data.batch_size=0 is invalid")
    assert snapshot(baseline) == before  # config.yaml, metrics.jsonl, train.log, checkpoints untouched


def test_resume_from_an_older_checkpoint_into_a_newer_run_is_refused(baseline, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    older = out / "checkpoints" / "step-00000006.pt"
    code, err = run_cli(monkeypatch, capsys, "pretrain", "greenmim-pretrain", *TINY, f"output_dir={out}", f"resume={older}")
    assert_one_line(code, err, "greenmim-pretrain", r"older than step-00000009.pt.*resume=auto.*fresh output_dir")


# ------------------------------------------------------------------ 4. resume never silently restarts
def test_resume_auto_with_every_checkpoint_unreadable_stops_and_deletes_nothing(baseline, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    for p in (out / "checkpoints").glob("*.pt"):
        p.write_bytes(b"truncated")
    before = snapshot(out)
    code, err = run_cli(monkeypatch, capsys, "pretrain", "greenmim-pretrain", *TINY, f"output_dir={out}", "resume=auto")
    assert_one_line(code, err, "greenmim-pretrain", r"none of the 2 checkpoint\(s\) in .* can be read \(step-00000009.pt, "
                                                    r"step-00000006.pt; .*nothing was deleted")
    assert snapshot(out) == before


def test_an_unreadable_newest_checkpoint_is_set_aside_not_deleted(baseline, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    (out / "checkpoints" / "step-00000009.pt").write_bytes(b"truncated")
    from greenmim.cli.pretrain import main

    monkeypatch.setattr(sys, "argv", ["greenmim-pretrain", *TINY, "trainer.epochs=4", f"output_dir={out}", "resume=auto"])
    main()
    log = capsys.readouterr().out
    assert re.search(r"skipped unreadable checkpoint step-00000009.pt .*moved it to", log)
    assert "resumed from" in log and "step-00000006.pt" in log
    assert (out / "checkpoints" / "unreadable" / "step-00000009.pt").read_bytes() == b"truncated"
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["step-00000009.pt", "step-00000012.pt"]


# ------------------------------------------------------------------ 5. preemption: SIGTERM, then resume=auto
def test_sigterm_checkpoints_and_resume_reproduces_the_uninterrupted_run(baseline, tmp_path):
    out = tmp_path / "run"
    # a worker process and a signal to the whole process group, as Ctrl-C or a scheduler sends it
    proc = subprocess.Popen(pretrain_cmd("trainer.epochs=3", f"output_dir={out}", "data.num_workers=1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    try:
        for line in proc.stdout:
            if "step 2/9" in line:
                os.killpg(proc.pid, signal.SIGTERM)
                break
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    m = re.fullmatch(r"greenmim-pretrain: stopped by SIGTERM at step (\d): saved (\S+); continue with the same command and resume=auto", last)
    assert m, last
    step = int(m.group(1))
    assert 2 <= step < 9 and Path(m.group(2)) == out / "checkpoints" / f"step-{step:08d}.pt"
    assert "received SIGTERM" in (out / "train.log").read_text()

    resumed = subprocess.run(pretrain_cmd("trainer.epochs=3", f"output_dir={out}", "resume=auto"), capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert train_losses(out) == train_losses(baseline)


class SignalledTask(ToyTask):
    """Rank 1 alone receives SIGUSR1 after step 1 (of 2 per epoch)."""

    def on_step_end(self, model, trainer):
        if trainer.dist.rank == 1 and trainer.step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)


def _preempted_rank(rank, init_file, out, results):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from greenmim.engine.errors import Preempted

    trainer = toy_trainer(out, SignalledTask(), log_every=1)  # under DDP signals are checked where values are read
    try:
        trainer.fit()
        results[rank] = "finished"
    except Preempted as exc:
        results[rank] = (trainer.step, exc.exit_code)
    finally:
        torch.distributed.destroy_process_group()


def test_all_ranks_stop_at_the_same_step_when_one_is_signalled(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_preempted_rank, args=(str(tmp_path / "init"), str(tmp_path / "out"), results), nprocs=2)
        results = dict(results)
    assert results == {0: (1, 128 + signal.SIGUSR1), 1: (1, 128 + signal.SIGUSR1)}
    ckpt = torch.load(tmp_path / "out" / "checkpoints" / "step-00000001.pt", weights_only=False)
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], len(ckpt["rank_states"])) == (1, 0, 1, 2)


def test_a_second_signal_exits_at_once(tmp_path):
    # the module alone (it imports nothing of greenmim), so that the subprocess starts in milliseconds
    module = Path(__file__).resolve().parents[1] / "greenmim" / "engine" / "signals.py"
    script = textwrap.dedent(f"""
        import importlib.util, os, signal, sys, time
        spec = importlib.util.spec_from_file_location("signals", {str(module)!r})
        signals = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(signals)
        with signals.StopSignals() as s:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.1)
            print("flag", s.requested, flush=True)
            if len(sys.argv) > 1:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            print("still running", flush=True)
    """)
    once = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=60)
    assert once.returncode == 0 and once.stdout.split() == ["flag", str(int(signal.SIGUSR1)), "still", "running"]
    twice = subprocess.run([sys.executable, "-c", script, "twice"], capture_output=True, text=True, env=ENV, timeout=60)
    assert twice.returncode == -signal.SIGINT and "still running" not in twice.stdout


# ------------------------------------------------------------------ 6. export never replaces the training checkpoint
def test_export_refuses_to_overwrite_its_checkpoint(baseline, tmp_path, capsys):
    from greenmim.cli.export import main

    ckpt = tmp_path / "step.pt"
    shutil.copy(baseline / "checkpoints" / "step-00000009.pt", ckpt)
    before = ckpt.read_bytes()
    for args, pattern in (([str(ckpt), "-o", str(ckpt)], r"must end in .safetensors"),
                          ([str(ckpt), "-o", str(tmp_path / "enc.pt")], r"must end in .safetensors"),
                          ([str(tmp_path / "none.pt")], r"checkpoint not found: .*none.pt \(pass the path")):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert_one_line(exc.value.code, capsys.readouterr().err.strip().splitlines(), "greenmim-export", pattern)
    # the same file under a .safetensors name (a hard link) is still the checkpoint itself
    os.link(ckpt, tmp_path / "step.safetensors")
    with pytest.raises(SystemExit) as exc:
        main([str(ckpt), "-o", str(tmp_path / "step.safetensors")])
    assert_one_line(exc.value.code, capsys.readouterr().err.strip().splitlines(), "greenmim-export", r"is the input .* would be replaced")
    assert ckpt.read_bytes() == before
    (tmp_path / "sub").mkdir()
    main([str(ckpt), "-o", str(tmp_path / "sub")])  # a folder: the default name inside it
    assert (tmp_path / "sub" / "step-encoder.safetensors").is_file()


def test_export_and_visualize_refuse_a_detection_checkpoint(baseline, tmp_path, capsys):
    from greenmim.cli.export import main as export_main
    from greenmim.cli.visualize import main as visualize_main

    ckpt = torch.load(baseline / "checkpoints" / "step-00000009.pt", weights_only=False)
    ckpt["config"] = {**ckpt["config"], "task": "detect"}
    path = tmp_path / "det.pt"
    torch.save(ckpt, path)
    for main, prog, args in ((export_main, "greenmim-export", []), (visualize_main, "greenmim-visualize", [str(tmp_path)])):
        with pytest.raises(SystemExit) as exc:
            main([str(path), *args])
        assert_one_line(exc.value.code, capsys.readouterr().err.strip().splitlines(), prog,
                        r"is a greenmim-detect checkpoint: pass a greenmim-pretrain checkpoint")


# ------------------------------------------------------------------ 7. malformed COCO polygons
def test_polygons_with_fewer_than_3_points_or_odd_length_are_skipped_or_named(tmp_path):
    root = make_coco_root(tmp_path / "coco")
    for split, why in (("val2017", "polygon has 2 point\\(s\\), fewer than 3"), ("train2017", "odd number of coordinates \\(5\\)")):
        args = (str(root / split), str(root / "annotations" / f"instances_{split}.json"))
        ds = CocoDetection(*args, bad_boxes="skip")
        assert ds.report.bad_annotations == 1 and 999 not in ds.coco.anns
        for img_id in ds.ids:  # every remaining annotation decodes (what training and COCOeval do)
            ds.target(img_id)
        with pytest.raises(CocoFormatError, match=f"annotation 999 .*{why}.*data.bad_boxes=skip"):
            CocoDetection(*args, bad_boxes="error")


# ------------------------------------------------------------------ 8 and 9. bad values: one line, exit 2, nothing written
@pytest.mark.parametrize("args, pattern", [
    (("model.mask_ratio=0.0",), r"model.mask_ratio=0.0 is invalid: set it to a number > 0 and < 1"),
    (("model.mask_ratio=1.0",), r"model.mask_ratio=1.0 is invalid"),
    (("model.mask_ratio=abc",), r"model.mask_ratio='abc' is invalid"),
    (("data.img_size=32",), r"masks none of the 1 unit\(s\) of a \(32, 32\) image"),
    (("data.batch_size=0",), r"data.batch_size=0 is invalid: set it to an integer >= 1"),
    (("data.batch_size=four",), r"data.batch_size='four' is invalid"),
    (("data.num_workers=-2",), r"data.num_workers=-2 is invalid: set it to an integer >= 0"),
    (("trainer.max_steps=0",), r"trainer.max_steps=0 is invalid: set it to an integer >= 1 \(or -1\)"),
    (("trainer.epochs=1.5",), r"trainer.epochs=1.5 is invalid"),
    (("optim.lr=-0.1",), r"optim.lr=-0.1 is invalid: set it to a number > 0 \(or null\)"),
    (("optim.blr=fast",), r"optim.blr='fast' is invalid"),
    (("optim.betas=[0.9,1.5]",), r"optim.betas=\[0.9, 1.5\] is invalid"),
    (("trainer.keep_last=0",), r"trainer.keep_last=0 is invalid"),
])
def test_bad_values_are_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys, args, pattern):
    out = tmp_path / "out"
    code, err = run_cli(monkeypatch, capsys, "pretrain", "greenmim-pretrain", *TINY, f"output_dir={out}", *args)
    assert_one_line(code, err, "greenmim-pretrain", pattern)
    assert not out.exists()


def test_an_output_dir_that_cannot_be_created_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run_cli(monkeypatch, capsys, "pretrain", "greenmim-pretrain", *TINY, f"output_dir={tmp_path / 'file' / 'run'}")
    assert_one_line(code, err, "greenmim-pretrain", r"output_dir=.*file/run cannot be created or written .*choose another output_dir=")


def test_resume_with_a_different_model_is_one_line(baseline, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    code, err = run_cli(monkeypatch, capsys, "pretrain", "greenmim-pretrain", *TINY, f"output_dir={out}", "resume=auto",
                        "model.decoder_dim=48")
    assert_one_line(code, err, "greenmim-pretrain", r"continues a run with another model \(model.decoder_dim: checkpoint 32, "
                                                    r"this command 48\): drop these overrides")


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=1)
    first = manager.save({"step": 1}, 1)
    good = first.read_bytes()

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match=f"no space left on {re.escape(str(tmp_path / 'checkpoints'))} while writing step-00000002.pt"):
        manager.save({"step": 2}, 2)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001.pt"] and first.read_bytes() == good


def test_a_deeper_checkpoint_into_a_shallower_model_lists_the_keys(tmp_path):
    import timm

    from greenmim.weights.loading import load_pretrained
    from greenmim.models import create_pretrain_model

    deep = dict(embed_dim=16, num_heads=(1, 1, 2, 2), window_size=2)
    model = create_pretrain_model("swin_tiny_patch4_window7_224", img_size=64, decoder_dim=32, decoder_heads=2, depths=(1, 2, 1, 1), **deep)
    path = tmp_path / "deep.pt"
    torch.save({"model": model.state_dict()}, path)
    shallow = timm.create_model("swin_tiny_patch4_window7_224", num_classes=3, img_size=64, depths=(1, 1, 1, 1), **deep)
    with pytest.raises(UserError, match=r"unexpected \d+: layers.1.blocks.1.*model.encoder_args"):
        load_pretrained(shallow, str(path))


def test_visualize_rejects_a_full_mask_and_names_its_own_options(baseline, tmp_path, capsys):
    from greenmim.cli.visualize import main

    ckpt = str(baseline / "checkpoints" / "step-00000009.pt")
    (tmp_path / "empty").mkdir()
    for args, pattern in ((["--mask-ratio", "1.0"], r"--mask-ratio=1.0 is outside \(0, 1\)"),
                          (["--img-size", "100"], r"--img-size"),
                          (["-o", ckpt], r"must end in .png")):
        with pytest.raises(SystemExit) as exc:
            main([ckpt, str(tmp_path / "empty"), *args])
        assert_one_line(exc.value.code, capsys.readouterr().err.strip().splitlines(), "greenmim-visualize", pattern)
    with pytest.raises(SystemExit) as exc:
        main([ckpt, str(tmp_path / "empty"), "-o", str(tmp_path / "r.png")])
    err = capsys.readouterr().err
    assert "check the folder argument" in err and "data." not in err
