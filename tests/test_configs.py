"""The Hydra config tree: safe defaults, per-task data groups, one trainer/ and hydra/ default, the
method switch (and the old simmim_* names), every experiment composing for its own entry point, and
the README's main command being the one CI runs."""
import ast
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
    cfg = cfg_of(task, f"experiment={name}")
    assert cfg.task == task
    from greenmim.cli.validate import check_config

    check_config(cfg, task)  # every shipped recipe passes the schema's one check


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


# ------------------------------------------------------------------ one default in one place: the YAML
PACKAGE = REPO / "greenmim"
LIMIT = 10


def _literal_get(node, nargs):
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
            and len(node.args) == nargs and not node.keywords
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
            and ast.unparse(node.func.value) not in ("os.environ", "environ"))  # the environment is not a config


def default_reads(source: str):
    """``(line, code)`` of every read that states a default for a named key: ``x.get("key", default)``
    (a default other than None) and ``x.get("key") or default``. Environment variables are not config keys."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if _literal_get(node, 2) and not (isinstance(node.args[1], ast.Constant) and node.args[1].value is None):
            yield node.lineno, ast.unparse(node)
        elif isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or) and _literal_get(node.values[0], 1):
            yield node.lineno, ast.unparse(node)


def package_default_reads(root=PACKAGE):
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        for line, code in default_reads(path.read_text()):
            yield rel, line, code


def test_code_reads_config_values_without_restating_defaults():
    """Defaults live in configs/ (the YAML); code reads ``cfg.key``. At most LIMIT reads in the package
    state a default, each for a key that is truly optional (an old checkpoint's record, a COCO file's
    optional field, a parameter group's optional scale). Was 119 on eb4e933."""
    reads = list(package_default_reads())
    assert len(reads) <= LIMIT, f"{len(reads)} reads restate a default (limit {LIMIT}); read the key instead:\n" + "\n".join(
        f"{rel}:{line}: {code}" for rel, line, code in reads)


def test_the_default_read_counter_finds_both_forms():
    found = [code for _, code in default_reads(
        'a = cfg.get("k", 1)\nb = cfg.get("k") or 2\nc = cfg.get("k")\nd = cfg.get("k", None)\ne = os.environ.get("RANK", "0")\nf = t.get(x, 1)\n')]
    assert found == ["cfg.get('k', 1)", "cfg.get('k') or 2"]


# ------------------------------------------------------------------ one range in one place: the rule table
#: keys with no rule in greenmim.engine.config's tables, and why
FREE_FORM = {
    "task": "checked against the entry point by run_app", "output_dir": "a path", "resume": "null, auto or a path",
    "checkpoint": "a path", "pretrained": "a path", "data.root": "a path", "data.train_images": "a path",
    "data.train_ann": "a path", "data.val_images": "a path", "data.val_ann": "a path", "data.val_labels": "a path",
    "data.split": "a folder name", "data.train_split": "a folder name", "data.val_split": "a folder name",
    "data.name": "a config group option", "optim.name": "a config group option", "data.synthetic": "a mapping or null",
    "model.name": "the registry (did-you-mean at build)", "model.method": "models.METHODS (create_pretrain_model)",
    "model.encoder_args": "cli.validate.check_model (check_architecture)", "data.img_size": "engine.config.check_img_size",
    "trainer.grad_checkpointing": "engine.config.check_grad_checkpointing", "data.decode": "data.check_decode (cli.validate)",
    "detector.maskrcnn": "engine.config.MASKRCNN_RULES", "aug.auto_augment": "a timm policy string",
    "aug.mixup_mode": "passed to timm", "aug.remode": "passed to timm", "aug.cutmix_minmax": "passed to timm",
    "data.interpolation": "passed to timm",
}


def composed_leaves():
    """``{dotted key: {python type names}}`` over every root config and every experiment of its task."""
    leaves = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict) and f"{prefix}{key}" not in FREE_FORM:
                walk(value, f"{prefix}{key}.")
            else:
                leaves.setdefault(f"{prefix}{key}", set()).add(type(value).__name__)

    for name, task in [(None, t) for t in TASKS] + list(experiments()):
        cfg = cfg_of(task, *([f"experiment={name}"] if name else []))
        walk(OmegaConf.to_container(cfg, resolve=False), "")
    return leaves


def test_every_config_key_has_exactly_one_rule_or_is_free_form():
    from greenmim.engine import config as schema

    ruled = ([r.key for r in schema.RULES] + [r.key for r, _ in schema.LIST_RULES] + list(schema.CHOICES)
             + list(schema.FLAGS) + list(schema.OPTIONAL_FLAGS))
    twice = sorted({k for k in ruled if ruled.count(k) > 1} | (set(ruled) & set(FREE_FORM)))
    assert not twice, f"stated more than once: {twice}"
    leaves = composed_leaves()
    loose = sorted(k for k in leaves if k not in ruled and k.split(".")[0] not in FREE_FORM
                   and ".".join(k.split(".")[:2]) not in FREE_FORM and k not in FREE_FORM)
    assert not loose, f"config keys without a rule (add one to greenmim.engine.config) or a FREE_FORM reason: {loose}"
    dead = sorted(k for k in ruled if k not in leaves and not any(k.startswith(f"{leaf}.") for leaf in leaves))
    assert not dead, f"rules for keys no config has: {dead}"
