"""What a new user hit (issue 22, item 6): a run inside its warmup, a refused run's leftovers, resuming
with another method, and the README's list of metrics.jsonl fields."""
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from cli_helpers import assert_one_line, run_cli
from greenmim.engine import OptimConfig, Trainer, TrainerConfig, TrainTask, UserError
from greenmim.engine.sampler import ResumableDistributedSampler

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = [
    "model=greenmim_swin_micro", "model.encoder_args.embed_dim=16", "model.encoder_args.depths=[1,1,1,1]",
    "model.encoder_args.num_heads=[1,1,2,2]", "model.decoder_dim=32", "model.decoder_heads=2",
    "data.img_size=64", "data.batch_size=4", "data.num_workers=0", "trainer.tensorboard=false", "vis.every_epochs=0",
]


class Toy(TrainTask):
    """A linear model on 16 random vectors, 4 per batch."""

    def build_model(self):
        return nn.Linear(4, 1)

    def build_train_loader(self, dist, seed):
        data = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=torch.Generator().manual_seed(1)))
        sampler = ResumableDistributedSampler(16, dist.world_size, dist.rank, shuffle=True, seed=seed)
        return torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)

    def training_step(self, model, batch, trainer):
        return model(batch[0]).pow(2).mean(), {}


def toy(out, sched=None, **kw):
    cfg = TrainerConfig.from_yaml(**{**dict(output_dir=str(out), epochs=2, device="cpu", tensorboard=False, log_every=1), **kw})
    return Trainer(Toy(), cfg, OptimConfig.from_yaml(), sched=sched or {"name": "cosine", "warmup_epochs": 0})


@pytest.mark.parametrize("warmup, warns", [({"warmup_epochs": 5}, True), ({"warmup_steps": 8}, True),
                                           ({"warmup_epochs": 1}, False)])
def test_a_run_no_longer_than_its_warmup_warns(warmup, warns, tmp_path):
    """16 steps (4 epochs of 4) inside a 5-epoch warmup, or 8 steps with an 8-step one: the lr only rises; say so."""
    toy(tmp_path, sched={"name": "cosine", **warmup}, epochs=4 if "warmup_epochs" in warmup else 2).fit()
    log = (tmp_path / "train.log").read_text()
    assert ("the lr only rises" in log) == warns, log
    if warns:
        key = next(iter(warmup))
        assert re.search(rf"lr warmup \(sched\.{key}={warmup[key]}: \d+ steps\) is as long as the whole run \(\d+ steps: "
                         r"trainer\.epochs=\d\)", log), log


@pytest.mark.parametrize("existing", [False, True])
def test_a_run_refused_on_a_data_error_leaves_no_folder_and_no_log(existing, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    code, err = run_cli(monkeypatch, capsys, "pretrain", "greenmim-pretrain", *TINY, "data=folder",
                        f"data.root={tmp_path / 'empty'}", f"output_dir={out}")
    assert_one_line(code, err, "greenmim-pretrain", r"no images .* found under .*empty: check data.root")
    assert out.exists() == existing
    assert not existing or list(out.iterdir()) == []


def test_a_failed_start_removes_only_what_it_created(tmp_path):
    """A refused start cuts an earlier run's train.log back to what it was; a run that wrote its files keeps them."""
    from greenmim.engine.rundir import run_folder

    (tmp_path / "train.log").write_text("an earlier run\n")
    with pytest.raises(UserError), run_folder(tmp_path):
        (tmp_path / "train.log").open("a").write("refused\n")
        raise UserError("bad data")
    assert (tmp_path / "train.log").read_text() == "an earlier run\n"
    out = tmp_path / "out"
    with pytest.raises(UserError), run_folder(out):
        (out / "train.log").write_text("started\n")
        (out / "config.yaml").write_text("{}\n")
        raise UserError("a failure after the run wrote its files")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "train.log"]


def test_resume_with_another_method_says_the_method_differs(tmp_path):
    toy(tmp_path, config={"task": "pretrain", "model": {"method": "greenmim"}}, stop_at_step=2).fit()
    with pytest.raises(UserError, match=r"was written with model\.method=greenmim, this run has model\.method=simmim: the method "
                                        r"differs; resume with model\.method=greenmim, or start a fresh output_dir=") as exc:
        toy(tmp_path, config={"task": "pretrain", "model": {"method": "simmim"}}, resume="auto").fit()
    assert "same model=" not in str(exc.value)


def readme_metrics_fields():
    """The backticked keys the README lists for metrics.jsonl (the quickstart paragraph)."""
    text = " ".join(README.read_text(encoding="utf-8").split())
    m = re.search(r"`metrics\.jsonl` \(a JSON object per progress line: (.*?)\), TensorBoard", text)
    assert m, "README: the metrics.jsonl field list moved; update this test"
    return {k for k in re.findall(r"`([^`]+)`", m.group(1)) if k == "step" or k.startswith(("train/", "epoch/"))}


def test_readme_lists_the_fields_metrics_jsonl_has(tmp_path):
    toy(tmp_path, clip_grad=1.0).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert set().union(*rows) == readme_metrics_fields()
