"""The shared training engine: sampler, schedules, optimizer groups, checkpoints, resume, non-finite losses."""
import json
import math
import random
import shutil

import pytest
import torch

from conftest import yaml_node
from greenmim.engine import (
    CheckpointManager,
    ConfigError,
    NonFiniteLossError,
    OptimConfig,
    ResumableDistributedSampler,
    SeededDataset,
    Trainer,
    TrainerConfig,
    UserError,
    atomic_save,
    build_optimizer,
    build_schedule,
    find_latest,
    load_checkpoint,
    resolve_resume,
    scaled_lr,
)
from greenmim.engine.schedule import apply_lr
from greenmim.tasks.pretrain.task import PretrainTask, build_pretrain_model

MICRO = dict(
    name="swin_tiny_patch4_window7_224", method="greenmim", mask_ratio=0.75, decoder_dim=32, decoder_depth=1,
    decoder_heads=2, norm_pix_loss=True,
    encoder_args=dict(embed_dim=16, window_size=4, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], drop_path_rate=0.1),
)
DATA = yaml_node("pretrain", "data", "data=synthetic", img_size=64, batch_size=4, num_workers=0, num_samples=16, synthetic_size=72)


# ----------------------------------------------------------------------------------------- sampler
def test_sampler_shards_are_disjoint_and_resume_skips_exactly():
    shards = [list(ResumableDistributedSampler(10, 2, r, seed=3)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert not set(shards[0]) & set(shards[1])
    s = ResumableDistributedSampler(10, 2, 1, seed=3)
    s.set_epoch(4)
    full = list(s)
    s.set_epoch(4)
    s.set_start(2)
    assert list(s) == full[2:] and len(s) == 3
    s.set_epoch(5)
    assert list(s) != full  # a new permutation, from the start


def test_seeded_dataset_is_reproducible_and_leaves_global_rng_alone():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3), random.random()

    ds = SeededDataset(Noise())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, b = ds[(1, 123)], ds[(1, 123)]
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(ds[(1, 124)][0], a[0])
    assert torch.equal(torch.get_rng_state(), before)


def test_seeded_dataset_forwards_nothing_of_what_it_wraps():
    """A DataLoader asks its dataset for ``__getitems__``: a ``Subset`` has one, and a forwarded one took
    the ``(index, seed)`` keys past the seeding (TypeError: list indices must be integers)."""
    subset = torch.utils.data.Subset([torch.rand(2) for _ in range(4)], [3, 2, 1, 0])
    ds = SeededDataset(subset)
    assert ds.dataset is subset and not hasattr(ds, "__getitems__") and not hasattr(ds, "indices")
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, sampler=[(0, 7), (1, 8)])))
    assert torch.equal(batch, torch.stack([subset[0], subset[1]]))


def test_worker_init_ignores_the_stop_signals_then_runs_the_loaders_own():
    import pickle
    import signal

    from greenmim.engine.signals import STOP_SIGNALS, ignore_stop_signals, with_ignored_stop_signals

    assert with_ignored_stop_signals(None) is ignore_stop_signals
    assert with_ignored_stop_signals(ignore_stop_signals) is ignore_stop_signals
    own = []
    init = with_ignored_stop_signals(own.append)
    pickle.loads(pickle.dumps(init))  # picklable: workers may be spawned, not forked
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        init(3)
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in STOP_SIGNALS)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert own == [3]


# ----------------------------------------------------------------------------------------- lr / optimizer
def test_warmup_cosine_and_step_schedules():
    s = build_schedule({"name": "cosine", "warmup_epochs": 1, "min_lr_ratio": 0.1}, total_steps=20, steps_per_epoch=5)
    f = [s.factor(i) for i in range(20)]
    assert f[0] == pytest.approx(0.2) and f[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[4:], f[5:])) and f[19] > 0.1
    st = build_schedule({"name": "step", "warmup_steps": 2, "milestones_epochs": [2, 3], "gamma": 0.1}, 20, 5)
    assert [round(st.factor(i), 6) for i in (0, 1, 5, 9, 10, 15)] == [0.5, 1.0, 1.0, 1.0, 0.1, 0.01]
    with pytest.raises(UserError, match="sched.name"):
        build_schedule({"name": "cosin"}, 10, 5)


def test_lr_scaling_and_no_decay_groups():
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    model = build_pretrain_model(MICRO, 64)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert any("relative_position_bias_table" in n for n in no_decay)
    assert "decoder.mask_token" in no_decay
    assert any(n.endswith(".bias") for n in no_decay) and any("norm" in n for n in no_decay)
    assert "encoder.layers.0.blocks.0.attn.qkv.weight" in decay
    assert not any("relative_position_bias_table" in n or n.endswith(".bias") for n in decay)
    # layer-decay style groups keep their ratio under the schedule
    groups = [{"params": [model.decoder.pred.weight], "lr_scale": 0.5}, {"params": [model.decoder.pred.bias]}]
    opt = build_optimizer(model, lr=1e-3, param_groups=groups)
    apply_lr(opt, 1e-3, 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.5e-4, 5e-4])


# ----------------------------------------------------------------------------------------- checkpoints
def test_atomic_checkpoints_retention_and_resume_resolution(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, keep_every_epochs=2)
    base = {"format": "greenmim-checkpoint", "x": 1}
    for step, epoch in [(1, None), (2, 1), (3, None), (4, 2), (5, None)]:
        mgr.save({**base, "step": step}, step, epoch)
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["epoch-0002-step-00000004.pt", "step-00000004.pt", "step-00000005.pt"]
    assert resolve_resume("auto", tmp_path).name == "step-00000005.pt"
    # a corrupt newer file (e.g. copied in half) is skipped, the latest valid one is used
    (tmp_path / "checkpoints" / "step-00000009.pt").write_bytes(b"garbage")
    assert find_latest(tmp_path).name == "step-00000005.pt"
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path / "empty") is None
    with pytest.raises(UserError, match="no such file"):
        resolve_resume(str(tmp_path / "missing.pt"), tmp_path)
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "checkpoints" / "step-00000009.pt")
    atomic_save({"a": 1}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="not a greenmim training checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    assert not list(tmp_path.rglob("*.tmp*"))


# ----------------------------------------------------------------------------------------- trainer
def make_trainer(out, task=None, **kw):
    cfg = dict(output_dir=str(out), epochs=2, log_every=1, tensorboard=False, seed=1)
    cfg.update(kw)
    task = task or PretrainTask(MICRO, DATA, vis_every_epochs=0)
    return Trainer(task, TrainerConfig.from_yaml(**cfg), OptimConfig.from_yaml(blr=1e-3), {"name": "cosine", "warmup_steps": 2})


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_resume_mid_epoch_reproduces_losses_exactly(tmp_path):
    """8 steps uninterrupted == 5 steps (checkpoint at 3, stop at 5) + resume=auto from the step-5 checkpoint;
    and a resume from the step-3 checkpoint (a crash between checkpoints) reproduces steps 4-8 too."""
    full = tmp_path / "full"
    make_trainer(full).fit()
    ref = losses(full)
    assert sorted(ref) == list(range(1, 9)) and all(math.isfinite(v) for v in ref.values())

    part = tmp_path / "part"
    make_trainer(part, ckpt_every_steps=3, stop_at_step=5, keep_last=3).fit()
    assert (part / "checkpoints" / "step-00000005.pt").is_file()
    mid = tmp_path / "step3.pt"
    shutil.copy(part / "checkpoints" / "step-00000003.pt", mid)
    t = make_trainer(part, resume="auto")
    t.fit()
    assert t.step == 8
    got = losses(part)
    assert got == ref  # bit-identical on CPU (steps 1-5 from the first run, 6-8 after the resume)

    crash = tmp_path / "crash"
    make_trainer(crash, resume=str(mid)).fit()
    assert losses(crash) == {s: ref[s] for s in range(4, 9)}


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    def params_after(out, batch, accum):
        t = make_trainer(out, task=PretrainTask({**MICRO, "encoder_args": {**MICRO["encoder_args"], "drop_path_rate": 0.0}},
                                                {**DATA, "batch_size": batch}, 0), max_steps=1, accum_steps=accum)
        t.fit()
        return {k: v.clone() for k, v in t.model.state_dict().items()}, t.effective_batch

    a, ea = params_after(tmp_path / "a", 4, 1)
    b, eb = params_after(tmp_path / "b", 2, 2)
    assert ea == eb == 4
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


class ExplodingTask(PretrainTask):
    """Returns a NaN loss at the given optimizer step."""

    def __init__(self, bad_step):
        super().__init__(MICRO, DATA, vis_every_epochs=0)
        self.bad_step = bad_step

    def training_step(self, model, batch, trainer):
        loss, metrics = super().training_step(model, batch, trainer)
        return (loss * float("nan") if trainer.step + 1 == self.bad_step else loss), metrics


def test_nonfinite_loss_stops_keeping_the_last_good_checkpoint(tmp_path):
    t = make_trainer(tmp_path, task=ExplodingTask(bad_step=4), ckpt_every_steps=2)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* step 4.*step-00000002\.pt.*trainer.nonfinite=skip"):
        t.fit()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002.pt"]
    assert load_checkpoint(tmp_path / "checkpoints" / "step-00000002.pt")["step"] == 2


def test_nonfinite_loss_skip_policy(tmp_path):
    t = make_trainer(tmp_path, task=ExplodingTask(bad_step=3), nonfinite="skip", epochs=1)
    t.fit()
    assert t.step == 4 and t.skipped_steps == 1
    assert all(math.isfinite(p.detach().sum()) for p in t.model.parameters())


def test_bf16_and_grad_checkpointing_run(tmp_path):
    t = make_trainer(tmp_path, precision="bf16", grad_checkpointing=[0, 2], max_steps=1)
    t.fit()
    assert t.model.encoder.layers[0].grad_checkpointing and not t.model.encoder.layers[1].grad_checkpointing
    assert math.isfinite(t.history[-1]["loss"])


def test_device_values_are_read_only_when_logging_or_checkpointing(tmp_path, monkeypatch):
    """A step never reads its loss on the host: the pending values are read in one batch at log and
    checkpoint boundaries (and at the epoch's end)."""
    from greenmim.engine import trainer as trainer_module

    reads = []
    original = trainer_module._EpochLog.read

    def counting_read(self):
        reads.append([step for step, _ in self.pending])
        return original(self)

    monkeypatch.setattr(trainer_module._EpochLog, "read", counting_read)
    t = make_trainer(tmp_path, epochs=1, log_every=3, ckpt_every_steps=2)
    t.fit()
    assert t.steps_per_epoch == 4
    assert reads == [[1, 2], [3], [4]]  # checkpoint at 2, log at 3, log/end at 4
    assert sorted(losses(tmp_path)) == [3, 4]


def test_nonfinite_step_is_skipped_on_the_device_without_touching_weights(tmp_path):
    t = make_trainer(tmp_path, task=ExplodingTask(bad_step=1), nonfinite="skip", max_steps=1, log_every=1)
    t.fit()
    assert t.skipped_steps == 1
    state = t.optimizer.state_dict()["state"]
    assert all(float(s["step"]) == 0 for s in state.values()), "AdamW did not count the skipped step"


# ----------------------------------------------------------------------------------------- format, resume rules
def test_a_version_1_checkpoint_still_loads_and_resumes(tmp_path):
    """A checkpoint dict built like format version 1 (with its never-read ``schedule``, and an early one
    without the later keys) is upgraded on load, and a run resumes from it as from a current one."""
    from greenmim.engine.checkpoint import VERSION, upgrade_checkpoint

    minimal = upgrade_checkpoint({"format": "greenmim-checkpoint", "version": 1, "model": {}, "epoch": 1, "step": 3,
                                  "schedule": {"step": 3, "total_steps": 8, "peak_lr": 1e-3}})
    assert minimal["version"] == VERSION and "schedule" not in minimal
    assert (minimal["batch_in_epoch"], minimal["skipped_steps"], minimal["world_size"], minimal["rank_states"]) == (0, 0, 1, [])

    full = tmp_path / "full"
    make_trainer(full, ckpt_every_steps=3, keep_last=5).fit()
    ref = losses(full)
    old = torch.load(full / "checkpoints" / "step-00000003.pt", weights_only=False)
    assert old["version"] == VERSION and "schedule" not in old
    old.update(version=1, schedule={"step": 3, "total_steps": 8, "peak_lr": 1e-3})
    del old["world_size"]
    v1 = tmp_path / "v1.pt"
    torch.save(old, v1)
    assert load_checkpoint(v1)["version"] == VERSION
    t = make_trainer(tmp_path / "resumed", resume=str(v1))
    t.fit()
    assert losses(tmp_path / "resumed") == {s: ref[s] for s in range(4, 9)}


def test_a_checkpoint_from_a_newer_format_is_refused(tmp_path):
    from greenmim.engine.checkpoint import VERSION

    atomic_save({"format": "greenmim-checkpoint", "version": VERSION + 1, "model": {}}, tmp_path / "new.pt")
    with pytest.raises(UserError, match=f"format version {VERSION + 1}.*upgrade greenmim"):
        load_checkpoint(tmp_path / "new.pt")


class EpochOnlySampler(torch.utils.data.Sampler):
    """A sampler with ``set_epoch`` but no ``set_start`` (as torch's DistributedSampler)."""

    def __init__(self, inner):
        self.inner = inner

    def set_epoch(self, epoch):
        self.inner.set_epoch(epoch)

    def __iter__(self):
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)


class PlainSamplerTask(PretrainTask):
    """A loader whose sampler cannot start mid-epoch."""

    def __init__(self):
        super().__init__(MICRO, DATA, vis_every_epochs=0)

    def build_train_loader(self, dist, seed):
        loader = super().build_train_loader(dist, seed)
        return torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=EpochOnlySampler(loader.sampler),
                                           collate_fn=loader.collate_fn, drop_last=True)


def test_mid_epoch_resume_needs_a_sampler_that_can_start_there(tmp_path):
    make_trainer(tmp_path, task=PlainSamplerTask(), stop_at_step=2).fit()  # epoch-aligned runs are fine
    with pytest.raises(ConfigError, match="cannot resume in the middle of epoch 1.*EpochOnlySampler.*ResumableDistributedSampler"):
        make_trainer(tmp_path, task=PlainSamplerTask(), resume="auto").fit()


class MetricTask(PretrainTask):
    """Reports the micro-batch's index in its window as a device metric."""

    def __init__(self):
        super().__init__(MICRO, DATA, vis_every_epochs=0)
        self.calls = 0

    def training_step(self, model, batch, trainer):
        loss, _ = super().training_step(model, batch, trainer)
        self.calls += 1
        return loss, {"micro": torch.tensor(float((self.calls - 1) % 2)), "constant": 5.0}


def test_task_metrics_are_averaged_over_the_window(tmp_path):
    make_trainer(tmp_path, task=MetricTask(), accum_steps=2, max_steps=2).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["train/micro"], r["train/constant"]) for r in rows if "train/micro" in r]
    assert logged == [(0.5, 5.0), (0.5, 5.0)]  # micro-batches 0 and 1 of each window, not the last one's 1.0


def test_detection_timing_script_reads_the_micro_model_from_the_configs():
    import runpy
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "detection_timing.py"), run_name="timing")
    name, args = script["model_config"]("micro")
    assert name == "swin_tiny_patch4_window7_224" and args["embed_dim"] == 32 and args["depths"] == (1, 1, 2, 1)
    assert script["model_config"]("swin_base_patch4_window7_224") == ("swin_base_patch4_window7_224", {})


def test_device_prefetch_gives_the_same_losses_and_resumes_exactly(tmp_path):
    """Batches moved to the device one step ahead (a background thread) change nothing: same losses as
    the plain loader, and a stop/resume=auto in the middle reproduces them."""
    def task(prefetch=True):
        return PretrainTask(MICRO, {**DATA, "device_prefetch": prefetch, "num_workers": 1}, vis_every_epochs=0)

    plain = tmp_path / "plain"
    make_trainer(plain, task=task(prefetch=False), epochs=1).fit()  # one loader worker too: the same CPU threads
    part = tmp_path / "part"
    make_trainer(part, task=task(), epochs=1, stop_at_step=2).fit()
    resumed = make_trainer(part, task=task(), epochs=1, resume="auto")
    resumed.fit()
    assert type(resumed.batches).__name__ == "DevicePrefetcher" and resumed.batches.loader is resumed.loader
    # the trainer sets its workers' stop-signal init on the DataLoader itself, not through the prefetcher
    assert isinstance(resumed.loader, torch.utils.data.DataLoader) and resumed.loader.worker_init_fn is not None
    assert losses(part) == losses(plain) and sorted(losses(plain)) == [1, 2, 3, 4]


class NaNGradientTask(PretrainTask):
    """A finite loss whose gradient is NaN at the given optimizer step."""

    def __init__(self, bad_step):
        super().__init__(MICRO, DATA, vis_every_epochs=0)
        self.bad_step = bad_step

    def training_step(self, model, batch, trainer):
        loss, metrics = super().training_step(model, batch, trainer)
        if trainer.step + 1 == self.bad_step:
            loss = loss + 0.0 * loss.detach()
            loss.register_hook(lambda g: g * float("nan"))
        return loss, metrics


def test_nonfinite_gradient_with_finite_loss_is_skipped_when_clipping(tmp_path):
    t = make_trainer(tmp_path, task=NaNGradientTask(bad_step=2), nonfinite="skip", epochs=1, clip_grad=1.0)
    t.fit()
    assert t.skipped_steps == 1 and "non-finite loss gradient (loss" in (tmp_path / "train.log").read_text()
    assert all(math.isfinite(p.detach().sum()) for p in t.model.parameters())


# ----------------------------------------------------------------------------------------- the step in one place
STEP_BUDGET = (16, 4)  # engine functions that run on every step, and the files they are in (issue 25)


def engine_functions_of_every_step(out, steps=12, skip=2):
    """Run ``steps`` steps of a tiny pretraining run (one loader worker, accumulation 2, clipping) under
    :func:`sys.setprofile`; return ``{file: {function}}`` of the functions defined under
    ``greenmim/engine/`` that were called (a generator's resume counts) during every step after the
    first ``skip``. A call is attributed to the step counter's value when it happens."""
    import sys
    from collections import defaultdict
    from pathlib import Path

    import greenmim.engine as engine

    root = str(Path(engine.__file__).parent) + "/"
    data = {**DATA, "num_samples": 4 * 2 * steps, "num_workers": 1}
    trainer = make_trainer(out, task=PretrainTask(MICRO, data, vis_every_epochs=0), epochs=1, log_every=10,
                           accum_steps=2, clip_grad=1.0)
    calls = defaultdict(set)

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(root):
            calls[trainer.step].add((frame.f_code.co_filename[len(root):], frame.f_code.co_qualname))

    sys.setprofile(profile)
    try:
        trainer.fit()
    finally:
        sys.setprofile(None)
    assert trainer.step == steps
    every = set.intersection(*(calls[s] for s in range(skip, steps - 1)))
    by_file = defaultdict(set)
    for file, name in every:
        by_file[file].add(name)
    return dict(by_file)


def test_the_engine_functions_of_every_step_are_few_and_in_few_files(tmp_path):
    """One step reads in one place: at most 16 engine functions in at most 4 files run on every step."""
    by_file = engine_functions_of_every_step(tmp_path)
    count = sum(len(names) for names in by_file.values())
    shown = "; ".join(f"{file} ({len(names)}): {', '.join(sorted(names))}" for file, names in sorted(by_file.items()))
    assert count <= STEP_BUDGET[0] and len(by_file) <= STEP_BUDGET[1], f"{count} functions in {len(by_file)} files: {shown}"
    assert "trainer.py" in by_file  # the profile saw the step (a test that cannot pass vacuously)
