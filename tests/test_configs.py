"""The Hydra config tree: safe defaults, per-task data groups, one trainer/ and hydra/ default, the
method switch (and the old simmim_* names), every experiment composing for its own entry point, and
the README's main command being the one CI runs."""
import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TASKS = ("pretrain", "finetune", "detect")


def unset(node, key):
    return OmegaConf.is_missing(node, key) or node[key] is None


def cfg_of(task, *overrides, hydra=False):
    with initialize_config_module("greenmim.configs", version_base="1.3"):
        return compose(task, overrides=list(overrides), return_hydra_config=hydra)


def test_no_root_config_runs_a_demo_unless_asked():
    pre = cfg_of("pretrain")
    assert pre.data.name == "imagefolder" and unset(pre.data, "root")
    assert pre.model.name == "swin_base_patch4_window7_224" and pre.model.method == "greenmim"
    fin = cfg_of("finetune")
    assert fin.data.name == "imagenet_cls" and unset(fin.data, "root")
    det = cfg_of("detect")
    assert det.data.name == "coco" and det.data.get("synthetic") is None
    quick = cfg_of("pretrain", "experiment=quickstart")
    assert quick.data.name == "synthetic" and quick.trainer.epochs == 8 and quick.model.encoder_args.embed_dim == 32


@pytest.mark.parametrize("task, other", [("pretrain", "coco"), ("pretrain", "imagenet_cls"), ("finetune", "folder"),
                                         ("finetune", "coco"), ("detect", "synthetic"), ("detect", "imagenet_cls")])
def test_another_tasks_dataset_is_rejected_when_composing(task, other):
    with pytest.raises(Exception, match=rf"Could not find 'data/{other}'"):
        cfg_of(task, f"data={other}")


def test_cli_names_the_valid_data_options(monkeypatch, capsys):
    from greenmim.cli.pretrain import main

    monkeypatch.setattr("sys.argv", ["greenmim-pretrain", "data=coco"])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2
    assert err == "greenmim-pretrain: error: unknown data=coco: choose one of folder, imagefolder, synthetic"


def test_one_shared_trainer_and_hydra_default():
    default = OmegaConf.load(CONFIGS / "trainer" / "default.yaml")
    for task in TASKS:
        assert "trainer" not in yaml.safe_load((CONFIGS / f"{task}.yaml").read_text())["defaults"][0]
        cfg = cfg_of(task, hydra=True)
        for key, value in default.items():
            if key not in ("device", "precision"):  # set by trainer=cpu
                assert cfg.trainer[key] == value, (task, key)
        assert cfg.trainer.device == "cpu"
        assert cfg.hydra.run.dir == "." and cfg.hydra.output_subdir is None and cfg.hydra.job.chdir is False
    assert cfg_of("finetune").trainer.clip_grad == 5.0 and cfg_of("detect").trainer.epochs == 12
    gpu = cfg_of("pretrain", "trainer=ddp").trainer
    assert gpu.device == "cuda" and gpu.precision == "bf16" and gpu.epochs == 800


def test_method_is_one_switch_and_old_simmim_names_still_work():
    names = sorted(p.stem for p in (CONFIGS / "model").glob("simmim_*.yaml"))
    assert names, "the old simmim_* names are kept as aliases"
    for name in names:
        alias = cfg_of("pretrain", f"model={name}", "data=synthetic").model
        switch = cfg_of("pretrain", f"model={name.replace('simmim_', 'greenmim_')}", "model.method=simmim",
                        "data=synthetic").model
        assert alias == switch and alias.method == "simmim", name
    assert all("method" not in (OmegaConf.load(p) or {}) for p in (CONFIGS / "model").glob("greenmim_*.yaml"))


def experiments():
    for path in sorted((CONFIGS / "experiment").glob("*.yaml")):
        yield path.stem, yaml.safe_load(path.read_text()).get("task")


@pytest.mark.parametrize("name, task", list(experiments()))
def test_every_experiment_composes_for_its_own_entry_point(name, task):
    assert task, f"experiment/{name}.yaml sets no task:"
    if not (CONFIGS / f"{task}.yaml").is_file():
        pytest.skip(f"no root config {task}.yaml")
    assert cfg_of(task, f"experiment={name}").task == task


def test_an_experiment_of_another_entry_point_is_named_as_such(monkeypatch, capsys):
    from greenmim.cli.detect import main

    monkeypatch.setattr("sys.argv", ["greenmim-detect", "experiment=quickstart"])
    with pytest.raises(SystemExit):
        main()
    assert "a pretrain recipe, not a detect one: run it with greenmim-pretrain" in capsys.readouterr().err


def test_ci_runs_the_readme_main_command():
    readme = (REPO / "README.md").read_text()
    main_cmd = re.search(r"^(pip install -e \"\.\[dev\]\" && greenmim-pretrain [^#\n]*?)\s*(#|$)", readme, re.M).group(1)
    assert "experiment=" in main_cmd  # the demo is asked for by name
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert main_cmd in ci and "pytest -q" in ci and "ruff check greenmim tests" in ci
