"""Run folders, checkpoints and resume (issues 17 and 18): one process per output_dir, no write into
another run's folder or into the data, one-line errors instead of tracebacks, resume that refuses what
it cannot continue exactly, and checkpoints written once."""
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_module

from cli_helpers import assert_one_line, run_cli
from greenmim.engine import OptimConfig, Trainer, TrainerConfig, TrainTask, UserError
from greenmim.engine import checkpoint as ckpt_mod
from greenmim.engine.checkpoint import load_checkpoint, set_aside
from greenmim.engine.rundir import _HELD
from greenmim.engine.sampler import ResumableDistributedSampler

TINY = [
    "model=greenmim_swin_micro", "model.encoder_args.embed_dim=16", "model.encoder_args.depths=[1,1,1,1]",
    "model.encoder_args.num_heads=[1,1,2,2]", "model.decoder_dim=32", "model.decoder_heads=2",
    "data=synthetic", "data.num_samples=12", "data.img_size=64", "data.batch_size=4", "data.num_workers=0",
    "trainer.log_every=1", "trainer.tensorboard=false", "vis.every_epochs=0",
]
FT_TINY = "model.encoder_args={embed_dim:16,depths:[1,1,1,1],num_heads:[1,1,2,2],window_size:2}"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def held(folder: Path) -> bool:
    """Whether this process still holds ``folder``'s run lock."""
    return str(folder.resolve()) in _HELD


def snapshot(root: Path):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class Toy(TrainTask):
    """A linear model on 16 random vectors; ``evaluate`` draws from the global RNG (as iterating a
    validation DataLoader does) and counts its calls in the task's checkpointed state."""

    def __init__(self, batch=4, metrics=True):
        self.batch, self.metrics, self.evals = batch, metrics, 0
        self.lrs = {}

    def build_model(self):
        return nn.Linear(4, 1)

    def build_train_loader(self, dist, seed):
        data = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=torch.Generator().manual_seed(1)))
        sampler = ResumableDistributedSampler(16, dist.world_size, dist.rank, shuffle=True, seed=seed)
        return torch.utils.data.DataLoader(data, batch_size=self.batch, sampler=sampler)

    def training_step(self, model, batch, trainer):
        return model(batch[0] + 0.01 * torch.randn_like(batch[0])).pow(2).mean(), {}

    def on_step_end(self, model, trainer):
        self.lrs[trainer.step] = trainer.optimizer.param_groups[0]["lr"]

    def evaluate(self, model, trainer):
        torch.rand(3)
        self.evals += 1
        return {"val": float(self.evals)} if self.metrics else {}

    def state_dict(self):
        return {"evals": self.evals}

    def load_state_dict(self, state):
        self.evals = state["evals"]


def toy(out, task=None, **kw):
    cfg = TrainerConfig.from_yaml(**{**dict(output_dir=str(out), epochs=2, device="cpu", tensorboard=False, log_every=100), **kw})
    return Trainer(task or Toy(), cfg, OptimConfig.from_yaml(), sched={"name": "cosine", "warmup_epochs": 0})


# ------------------------------------------------------------------ 18.1 one process per output_dir
HOLD = ("import fcntl, os, socket, sys, time\n"
        "f = open(os.path.join(sys.argv[1], '.lock'), 'a+'); fcntl.lockf(f, fcntl.LOCK_EX)\n"
        "f.write(f'{os.getpid()} {socket.gethostname()}'); f.flush(); print('locked', flush=True); time.sleep(120)\n")


@pytest.fixture
def holder(tmp_path):
    """A process holding ``tmp_path/out``'s lock, as a running greenmim run does; killed with SIGKILL."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield out, proc
    proc.kill()
    proc.wait()


def cli_args(kind, folders, out):
    return {
        "pretrain": ("pretrain", "greenmim-pretrain", *TINY, f"output_dir={out}"),
        "finetune": ("finetune", "greenmim-finetune", "experiment=finetune_quick", f"data.root={folders}", f"output_dir={out}"),
        "knn": ("finetune", "greenmim-finetune", "experiment=knn", f"data.root={folders}", f"output_dir={out}"),
        "linear_probe": ("finetune", "greenmim-finetune", "experiment=linear_probe", f"data.root={folders}", f"output_dir={out}"),
        "detect": ("detect", "greenmim-detect", "experiment=detect_quick", f"output_dir={out}"),
        "resume": ("pretrain", "greenmim-pretrain", *TINY, f"output_dir={out}", "resume=auto"),
    }[kind]


@pytest.mark.parametrize("kind", ["pretrain", "resume", "finetune", "knn", "linear_probe", "detect"])
def test_a_second_process_in_a_running_output_dir_is_refused_naming_its_pid(kind, holder, folders, monkeypatch, capsys):
    out, proc = holder
    before = snapshot(out)
    module, prog, *args = cli_args(kind, folders, out)
    code, err = run_cli(monkeypatch, capsys, module, prog, *args)
    assert_one_line(code, err, prog, rf"output_dir={re.escape(str(out))} is in use by another greenmim run \(pid {proc.pid}\): "
                                     r"wait for it to end or stop it \(then resume=auto continues it\), or choose another output_dir=")
    assert snapshot(out) == before  # nothing written, the holder's lock file untouched


def test_a_lock_left_by_a_killed_run_does_not_block_and_the_trainer_locks_too(holder):
    out, proc = holder
    with pytest.raises(UserError, match=rf"in use by another greenmim run \(pid {proc.pid}\)"):
        toy(out).fit()  # the engine alone (no CLI) takes the lock as well
    assert not (out / "checkpoints").exists() and not held(out)
    proc.kill()  # kill -9: no cleanup; the stale .lock file naming the dead pid stays
    proc.wait()
    assert (out / ".lock").read_text().startswith(f"{proc.pid} ")
    trainer = toy(out)
    trainer.fit()
    assert trainer.step == 8 and not (out / ".lock").exists() and not held(out)  # released (and removed) on exit


def test_the_run_folder_has_one_owner_that_hands_it_to_the_trainer(tmp_path, monkeypatch):
    """One lock per run: the CLI's run_folder holds it and gives the RunFolder to the trainer (which
    then locks nothing); a trainer given none holds its folder itself; a second lock of a folder this
    process holds is a bug, refused (no re-entrant depth counter)."""
    from greenmim.engine import rundir

    calls, original = [], rundir.acquire_lock
    monkeypatch.setattr(rundir, "acquire_lock", lambda folder: (calls.append(Path(folder)), original(folder))[1])
    with rundir.run_folder(tmp_path) as folder:
        trainer = Trainer(Toy(), TrainerConfig.from_yaml(output_dir=str(tmp_path), epochs=1, device="cpu", tensorboard=False),
                          OptimConfig.from_yaml(), {"name": "cosine", "warmup_epochs": 0}, folder)
        trainer.fit()
        assert trainer.step == 4 and held(tmp_path)  # still the owner's when the trainer ends
        with pytest.raises(RuntimeError, match="already locked by this process"):
            original(tmp_path)
    assert calls == [tmp_path] and not held(tmp_path) and not (tmp_path / ".lock").exists()
    toy(tmp_path / "alone", epochs=1).fit()
    assert calls == [tmp_path, tmp_path / "alone"]


def test_forked_loader_workers_do_not_keep_the_lock(tmp_path):
    """A fork (as DataLoader workers are made) inherits descriptors; the run's lock must not go with them,
    or workers still alive after their parent was killed would block the next run."""
    from greenmim.engine.rundir import acquire_lock

    acquire_lock(tmp_path)
    child = os.fork()
    if child == 0:  # a worker that outlives its parent's lock
        time.sleep(30)
        os._exit(0)
    try:
        _HELD.pop(str(tmp_path.resolve())).close()  # the parent dies (kill -9): the kernel closes its files
        assert (tmp_path / ".lock").exists()
        probe = "import fcntl, sys; fcntl.lockf(open(sys.argv[1] + '/.lock', 'a+'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
        assert subprocess.run([sys.executable, "-c", probe, str(tmp_path)]).returncode == 0
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    class Failing(Toy):
        def evaluate(self, model, trainer):
            raise OSError("unreadable validation image")

    with pytest.raises(OSError):
        toy(tmp_path, Failing()).fit()
    assert not held(tmp_path) and not (tmp_path / ".lock").exists()
    resumed = toy(tmp_path, resume="auto")
    resumed.fit()
    assert resumed.step == 8


# ------------------------------------------------------------------ 18.2 frozen evaluations never write into another run
@pytest.mark.parametrize("protocol", ["knn", "linear_probe"])
@pytest.mark.parametrize("present", ["checkpoints/step-00000003.pt", "config.yaml", "metrics.jsonl"])
def test_a_frozen_evaluation_refuses_another_runs_folder(protocol, present, folders, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pretrain_run"
    (out / present).parent.mkdir(parents=True, exist_ok=True)
    (out / present).write_text("task: pretrain\n" if present == "config.yaml" else '{"step": 3, "train/loss": 0.5}\n')
    before = snapshot(out)
    module, prog, *args = cli_args(protocol, folders, out)
    code, err = run_cli(monkeypatch, capsys, module, prog, *args)
    assert_one_line(code, err, prog, rf"output_dir={re.escape(str(out))} already holds a run \({re.escape(present)}\); "
                                     rf"protocol={protocol} writes a run of its own: choose a fresh output_dir=")
    assert snapshot(out) == before


# ------------------------------------------------------------------ 18.3 never into the data
@pytest.mark.parametrize("kind", ["pretrain", "knn", "symlink"])
def test_an_output_dir_inside_data_root_is_refused(kind, folders, tmp_path, monkeypatch, capsys):
    data = tmp_path / "photos"
    shutil.copytree(folders / "train", data)
    before = snapshot(data)
    root = data
    if kind == "symlink":  # the same folder under another name
        (tmp_path / "link").symlink_to(data)
        root = tmp_path / "link"
    out = data / "runs" / "r1"
    if kind == "knn":
        args = ("finetune", "greenmim-finetune", "experiment=knn", f"data.root={root}", f"output_dir={out}")
    else:
        tiny = [a for a in TINY if not a.startswith(("data=", "data.num_samples"))]
        args = ("pretrain", "greenmim-pretrain", *tiny, "data=folder", f"data.root={root}", f"output_dir={out}")
    code, err = run_cli(monkeypatch, capsys, *args)
    assert_one_line(code, err, args[1], r"output_dir=.* is inside data.root=.*: .*choose an output_dir= outside data.root")
    assert snapshot(data) == before and not (data / "runs").exists()


# ------------------------------------------------------------------ 18 tracebacks -> one line, exit 2 / 130
def test_an_unresolvable_output_dir_is_one_line(tmp_path, monkeypatch, capsys):
    code, err = run_cli(monkeypatch, capsys, "pretrain", "greenmim-pretrain", *TINY, "output_dir=${oops.key}")
    assert_one_line(code, err, "greenmim-pretrain", r"output_dir: Interpolation key 'oops.key' not found; fix the \$\{\.\.\.\} reference")


@pytest.mark.parametrize("blocked", ["under_a_file", "read_only"])
def test_knn_into_an_output_dir_that_cannot_be_written_is_one_line(blocked, folders, tmp_path, monkeypatch, capsys):
    if blocked == "under_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "knn"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out = ro / "knn"
    try:
        code, err = run_cli(monkeypatch, capsys, *cli_args("knn", folders, out))
    finally:
        if blocked == "read_only":
            ro.chmod(0o700)
    assert_one_line(code, err, "greenmim-finetune", r"output_dir=.*knn cannot be created or written \(.*\): choose another output_dir=")


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    from greenmim.engine import trainer as trainer_mod

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_mod.Trainer, "_build_loader", interrupted)  # Ctrl-C while the data is set up
    code, err = run_cli(monkeypatch, capsys, "pretrain", "greenmim-pretrain", *TINY, f"output_dir={tmp_path / 'r'}")
    assert_one_line(code, err, "greenmim-pretrain", r"interrupted \(Ctrl-C\) before training started.*run the same command again",
                    exit_code=130, prefix="")
    assert not held(tmp_path / "r") and not (tmp_path / "r" / ".lock").exists()


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_ctrl_c_while_the_command_imports_is_one_line_and_exit_130(inherited, tmp_path):
    """A real SIGINT to a real process while torch imports: sent once ``-X importtime`` reports ``greenmim.cli``
    imported (the package the console scripts import first). The test then stops reading stderr, so the child
    blocks on the full pipe inside torch's import (~64 KB of import lines later) and the signal lands there.
    ``ignored``: the child starts with SIGINT ignored, as a non-interactive shell starts background commands
    (CI scripts run with ``&``, ``nohup``); before the fix it ignored the signal and trained on. One epoch
    (``trainer.epochs=1``) so that a missed signal fails in seconds, not at the timeout."""
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if inherited == "ignored" else None
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "greenmim.cli.pretrain", *TINY, "trainer.epochs=1",
                             f"output_dir={tmp_path / 'r'}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=ignore)
    try:
        for line in proc.stderr:
            if line.rstrip().endswith("| greenmim.cli"):
                break
        else:
            pytest.fail(f"no '| greenmim.cli' import line; exit code {proc.wait()}")
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines = [ln for ln in rest.strip().splitlines() if not ln.startswith("import time:")]
    assert proc.returncode == 130, rest[-2000:]
    assert len(lines) == 1 and "Traceback" not in rest, lines
    assert lines[0].startswith("greenmim-pretrain: interrupted (Ctrl-C) before training started"), lines
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ 18 resume refuses what it cannot continue exactly
@pytest.mark.parametrize("change", [{"batch": 2}, {"accum_steps": 2}])
def test_resume_with_another_batch_size_is_refused(change, tmp_path):
    toy(tmp_path, stop_at_step=2).fit()  # mid-epoch: 8 of 16 samples seen
    before = snapshot(tmp_path)
    kw = {"accum_steps": change.get("accum_steps", 1)}
    with pytest.raises(UserError, match=r"was written with data.batch_size=4 x trainer.accum_steps=1 per process, this run has "
                                        rf"{change.get('batch', 4)} x {kw['accum_steps']}: .*resume with data.batch_size=4 "
                                        r"trainer.accum_steps=1, or start a fresh output_dir="):
        toy(tmp_path, Toy(batch=change.get("batch", 4)), resume="auto", **kw).fit()
    assert snapshot(tmp_path) == before


def test_a_version_2_checkpoint_takes_its_batch_size_from_its_config(tmp_path):
    toy(tmp_path, epochs=1, config={"data": {"batch_size": 4}, "trainer": {"accum_steps": 1}}).fit()
    path = tmp_path / "checkpoints" / "step-00000004.pt"
    raw = torch.load(path, weights_only=False)
    for key in ("micro_batch", "accum_steps", "lr_schedule"):
        del raw[key]
    raw["version"] = 2
    torch.save(raw, path)
    ckpt = load_checkpoint(path)
    assert (ckpt["version"], ckpt["micro_batch"], ckpt["accum_steps"], ckpt["lr_schedule"]) == (3, 4, 1, None)


def test_orphaned_temporary_checkpoint_files_are_removed_on_resume_and_nothing_else(tmp_path):
    toy(tmp_path, stop_at_step=2).fit()
    folder = tmp_path / "checkpoints"
    orphans = [".step-00000003.pt.tmp4242", ".epoch-0001-step-00000004.pt.tmp17", ".step-00000004.after-eval.tmp9",
               ".best.pt.tmp55"]
    kept = [folder / ".notes.tmp1", folder / "step-00000002.pt.tmp3", folder / "mine.pt", tmp_path / ".step-00000003.pt.tmp4242"]
    for name in orphans:
        (folder / name).write_bytes(b"half a checkpoint")
    for path in kept:
        path.write_bytes(b"not ours to delete")
    toy(tmp_path, resume="auto").fit()
    assert not any((folder / name).exists() for name in orphans)
    assert all(p.read_bytes() == b"not ours to delete" for p in kept)


def test_a_second_unreadable_checkpoint_of_the_same_name_keeps_the_first(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for content in (b"first", b"second", b"third"):
        (folder / "step-00000009.pt").write_bytes(content)
        set_aside([(folder / "step-00000009.pt", "truncated")])
    kept = sorted((folder / "unreadable").iterdir())
    assert [p.name for p in kept] == ["step-00000009.2.pt", "step-00000009.3.pt", "step-00000009.pt"]
    assert [p.read_bytes() for p in kept] == [b"second", b"third", b"first"]


# ------------------------------------------------------------------ 18 messages that say what was given
def test_resume_from_a_fine_tune_checkpoint_names_it_and_the_cli_that_resumes_it(tmp_path):
    toy(tmp_path / "ft", epochs=1, config={"task": "finetune"}).fit()
    ckpt = tmp_path / "ft" / "checkpoints" / "step-00000004.pt"
    with pytest.raises(UserError, match=r"is a greenmim-finetune checkpoint, not a greenmim-pretrain one: resume it with "
                                        r"greenmim-finetune \(same output_dir, resume=auto\)") as exc:
        toy(tmp_path / "pre", config={"task": "pretrain"}, resume=str(ckpt)).fit()
    assert "same model=" not in str(exc.value)
    best = tmp_path / "best.pt"
    torch.save({"format": "greenmim-classifier", "model": {}}, best)
    with pytest.raises(UserError, match=r"is a fine-tuned classifier .*eval_only=true checkpoint=PATH.*pretrained=PATH"):
        load_checkpoint(best)


def test_pretrained_a_folder_says_it_is_a_folder_and_names_the_newest_checkpoint(tmp_path):
    from greenmim.weights.loading import read_checkpoint

    run = tmp_path / "run"
    toy(run, epochs=2, ckpt_every_steps=2, keep_last=5).fit()
    for given in (run, run / "checkpoints"):
        with pytest.raises(UserError, match=rf"'{re.escape(str(given))}' is a folder, not a checkpoint file: pass a file to "
                                            rf"pretrained= \(or checkpoint=\), e.g. the newest checkpoint inside, .*step-00000008.pt"):
            read_checkpoint(str(given))


def test_eval_only_on_a_pretraining_checkpoint_says_fine_tune_it_first(folders, pretrained, tmp_path, monkeypatch, capsys):
    code, err = run_cli(monkeypatch, capsys, "finetune", "greenmim-finetune", "experiment=finetune_quick", f"data.root={folders}",
                        f"output_dir={tmp_path / 'ev'}", "data.img_size=64", "data.num_workers=0", FT_TINY, "eval_only=true",
                        f"checkpoint={pretrained}")
    assert_one_line(code, err, "greenmim-finetune", r"holds no classifier head: it is a greenmim-pretrain checkpoint \(an encoder\), "
                                                    rf"not a fine-tuned classifier: fine-tune it first with pretrained={re.escape(str(pretrained))}")
    assert "only the head" not in err[0]


def test_an_unquoted_unicode_output_dir_says_how_to_quote_it(tmp_path, monkeypatch, capsys):
    out = f"{tmp_path}/résultats"
    code, err = run_cli(monkeypatch, capsys, "pretrain", "greenmim-pretrain", *TINY, f"output_dir={out}")
    assert_one_line(code, err, "greenmim-pretrain", rf"cannot parse the override output_dir={re.escape(out)} .*quote the value, "
                                                    rf"e.g. 'output_dir=\"{re.escape(out)}\"'")
    quoted = re.search(r"'(output_dir=\".*\")'", err[0]).group(1)
    with initialize_config_module("greenmim.configs", version_base="1.3"):  # the suggested quoting parses to the folder
        assert compose("pretrain", overrides=[*TINY, quoted]).output_dir == out


# ------------------------------------------------------------------ 17 max_steps changed on resume
def cosine(progress):
    return 0.5 * (1 + math.cos(math.pi * progress))


def test_a_larger_max_steps_on_resume_continues_the_schedule_and_ends_exactly_there(tmp_path):
    first = toy(tmp_path / "a", Toy(), epochs=10, max_steps=8, stop_at_step=4)
    first.fit()
    peak = first.peak_lr
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    # one resume to 12 steps ...
    once = toy(tmp_path / "a", Toy(), epochs=10, max_steps=12, resume="auto")
    once.fit()
    assert once.step == 12
    # the lr of step 5 is the old schedule's (no jump), then the rest is re-timed to end at step 12
    expected = {s: peak * cosine(0.5 + 0.5 * (s - 1 - 4) / 8) for s in range(5, 13)}
    assert once.task.lrs == pytest.approx(expected, rel=1e-9)
    assert once.task.lrs[5] == pytest.approx(peak * cosine(4 / 8))
    # ... equals two resumes (the re-timing is stored in the checkpoints and reloaded)
    toy(tmp_path / "b", Toy(), epochs=10, max_steps=12, stop_at_step=9, resume="auto").fit()
    twice = toy(tmp_path / "b", Toy(), epochs=10, max_steps=12, resume="auto")
    twice.fit()
    assert twice.step == 12
    assert twice.task.lrs == pytest.approx({s: expected[s] for s in range(10, 13)}, rel=1e-12)


def test_extending_a_finished_run_trains_the_added_steps_on_the_new_lengths_schedule(tmp_path):
    """Issue 22.1: a finished 16-step run resumed with max_steps=32 trains steps 17-32 at the lr of a
    32-step run, entered through a re-warmup over the configured warmup (4 steps), not at the ended
    schedule's lr 0; the log line says so."""
    sched = {"name": "cosine", "warmup_steps": 4}
    cfg = dict(output_dir=str(tmp_path), epochs=10, device="cpu", tensorboard=False, log_every=100)
    first = Trainer(Toy(), TrainerConfig.from_yaml(**cfg, max_steps=16), OptimConfig.from_yaml(), sched=sched)
    first.fit()
    weights = first.model.weight.detach().clone()
    ext = Trainer(Toy(), TrainerConfig.from_yaml(**cfg, max_steps=32, resume="auto"), OptimConfig.from_yaml(), sched=sched)
    ext.fit()
    assert ext.step == 32 and not torch.equal(ext.model.weight.detach(), weights)
    peak = first.peak_lr
    expected = {s: peak * cosine((s - 1 - 4) / 28) * min(1.0, (s - 16) / 4) for s in range(17, 33)}
    assert ext.task.lrs == pytest.approx(expected, rel=1e-9)
    assert ext.task.lrs[17] == pytest.approx(peak * cosine(12 / 28) / 4) and ext.task.lrs[17] > 0.1 * peak
    log = (tmp_path / "train.log").read_text()
    assert re.search(r"after its schedule ended: steps 17-32 follow the 32-step schedule .*re-warmup over 4 step\(s\): "
                     rf"lr {expected[17]:.3g} at step 17, {expected[20]:.3g} at step 20, {expected[32]:.3g} at step 32", log)
    # a second extension of the extended run re-warms again from its own end
    again = Trainer(Toy(), TrainerConfig.from_yaml(**cfg, max_steps=40, resume="auto"), OptimConfig.from_yaml(), sched=sched)
    again.fit()
    assert again.task.lrs[33] == pytest.approx(peak * cosine((32 - 4) / 36) / 4, rel=1e-9)


def test_a_run_ended_by_max_steps_inside_an_epoch_resumes_from_its_true_position(tmp_path):
    toy(tmp_path, Toy(), epochs=10, max_steps=6).fit()  # 4 steps per epoch: ends 2 steps into epoch 2
    ckpt = torch.load(tmp_path / "checkpoints" / "step-00000006.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"]) == (1, 2)
    resumed = toy(tmp_path, Toy(), epochs=10, max_steps=11, resume="auto")
    resumed.fit()
    assert resumed.step == 11  # not 10: the rest of epoch 2 is trained, not skipped
    assert sorted(resumed.task.lrs) == list(range(7, 12))


# ------------------------------------------------------------------ 17 the epoch checkpoint is written once
def test_the_epoch_checkpoint_is_written_once_and_resume_keeps_the_evaluations_state(tmp_path, monkeypatch):
    writes = []
    real = ckpt_mod.atomic_save
    monkeypatch.setattr(ckpt_mod, "atomic_save", lambda obj, path: (writes.append(Path(path).name), real(obj, path))[1])
    full = toy(tmp_path / "full", Toy(), epochs=3)
    full.fit()
    assert writes == ["step-00000004.pt", "step-00000004.after-eval", "step-00000008.pt", "step-00000008.after-eval",
                      "step-00000012.pt", "step-00000012.after-eval"]
    after_eval = torch.load(tmp_path / "full" / "checkpoints" / "step-00000008.after-eval", weights_only=False)
    assert after_eval["metrics"] == {"val": 2.0} and after_eval["step"] == 8
    # keep_last=2: the sidecar of the pruned step-4 went with it
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == [
        "step-00000008.after-eval", "step-00000008.pt", "step-00000012.after-eval", "step-00000012.pt"]

    # resume from epoch 2's checkpoint (its sidecar holds the post-evaluation task state and RNG): epoch 3 is bit-identical
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    for p in (part / "checkpoints").glob("step-00000012.*"):
        p.unlink()
    resumed = toy(part, Toy(), epochs=3, resume="auto")
    resumed.fit()
    assert resumed.task.evals == 3 and resumed.task.state_dict() == full.task.state_dict()
    a = torch.load(tmp_path / "full" / "checkpoints" / "step-00000012.pt", weights_only=False)["model"]
    b = torch.load(part / "checkpoints" / "step-00000012.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_max_steps_below_the_checkpoints_step_trains_nothing_more(tmp_path):
    toy(tmp_path, Toy(), epochs=10, max_steps=8).fit()
    before = snapshot(tmp_path / "checkpoints")
    shorter = toy(tmp_path, Toy(), epochs=10, max_steps=6, resume="auto")
    shorter.fit()
    assert shorter.step == 8 and shorter.task.lrs == {} and snapshot(tmp_path / "checkpoints") == before


def test_pruning_sidecars_leaves_files_of_other_names_alone(tmp_path):
    """Sidecars of pruned steps go; a stray ``step-*.after-eval`` of another name neither breaks the
    save nor is deleted."""
    from greenmim.engine import CheckpointManager

    manager = CheckpointManager(tmp_path, keep_last=1)
    stray = manager.folder / "step-notes.after-eval"
    manager.folder.mkdir(parents=True)
    stray.write_text("mine")
    for step in (1, 2):
        manager.save_after_eval({"step": step}, step)
        manager.save({"step": step}, step)
    assert sorted(p.name for p in manager.folder.iterdir()) == ["step-00000002.after-eval", "step-00000002.pt", "step-notes.after-eval"]
    assert stray.read_text() == "mine"
