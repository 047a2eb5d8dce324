"""Config values and classification inputs (issues 17 and 18, h6's items): every bad value is one line
naming the fix, exit 2, before anything is written; a single class is refused; top-5 only with more
than 5 classes; the YAML is the one source of each default; architecture keys need no ``+``."""
import inspect
from importlib import resources
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from finetune_helpers import TINY, compose, make_folders
from cli_helpers import assert_one_line, run_cli

from greenmim.engine import OptimConfig, TrainerConfig
from greenmim.engine.errors import UserError
from greenmim.tasks.frozen_eval import knn_scores, train_linear_probe
from greenmim.tasks.finetune.data import build_classification_data
from greenmim.tasks.finetune.evaluate import build_eval_loader, evaluate

CONFIGS = Path(str(resources.files("greenmim.configs")))
FT = "greenmim-finetune"


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    root = make_folders(tmp_path_factory.mktemp("cls"), per_class=(3, 2))
    for split in ("train", "val"):  # keep class0 and class1
        for p in (root / split / "class2").iterdir():
            p.unlink()
        (root / split / "class2").rmdir()
    return root


def finetune_cli(monkeypatch, capsys, out, *args):
    code, err = run_cli(monkeypatch, capsys, "finetune", FT, *args, f"output_dir={out}")
    assert not out.exists(), "the check must come before anything is written"
    return code, err


# ------------------------------------------------------------------ range checks: one line, exit 2, before any write
@pytest.mark.parametrize("override, pattern", [
    ("knn.k=0", r"knn\.k=0 is invalid: set it to an integer >= 1"),
    ("knn.temperature=0", r"knn\.temperature=0 is invalid: set it to a number > 0"),
    ("probe.epochs=0", r"probe\.epochs=0 is invalid"),
    ("probe.batch_size=0", r"probe\.batch_size=0 is invalid: set it to an integer >= 2"),
    ("probe.batch_size=1", r"probe\.batch_size=1 is invalid: set it to an integer >= 2"),
    ("probe.blr=-1", r"probe\.blr=-1 is invalid: set it to a number > 0"),
    ("trainer.grad_checkpointing=abc", r"trainer\.grad_checkpointing='abc' is invalid: set it to true .* list of stage indices"),
    ("model.encoder_args.window_size=0", r"model\.encoder_args\.window_size=0 is invalid: set it to a positive integer"),
    ("model.encoder_args.num_heads=[1,2,3,8]", r"model\.encoder_args\.num_heads=\[1, 2, 3, 8\] is invalid: stage 2 has width 128 and 3 heads"),
    ("model.encoder_args.depths=[1,1]", r"model\.encoder_args\.num_heads=.* one value per stage \(2 stages"),
])
def test_bad_eval_and_model_values_are_one_line(monkeypatch, capsys, folders, tmp_path, override, pattern):
    code, err = finetune_cli(monkeypatch, capsys, tmp_path / "run", "experiment=linear_probe", f"data.root={folders}", override)
    assert_one_line(code, err, FT, pattern)


def test_decoder_heads_must_divide_decoder_dim(monkeypatch, capsys, tmp_path):
    out = tmp_path / "run"
    code, err = run_cli(monkeypatch, capsys, "pretrain", "greenmim-pretrain", "experiment=quickstart", "model.decoder_heads=3", f"output_dir={out}")
    assert_one_line(code, err, "greenmim-pretrain", r"model\.decoder_heads=3 does not divide model\.decoder_dim=64: use one of 1, 2, 4, 8, 16, 32")
    assert not out.exists()


def test_model_check_without_encoder_args_still_checks_the_decoder():
    """A model config without ``encoder_args`` (timm's defaults) is checked, not crashed on."""
    from greenmim.cli.validate import check_model
    from greenmim.engine.errors import ConfigError

    cfg = OmegaConf.create({"model": {"name": "swin_tiny_patch4_window7_224", "decoder_dim": 64, "decoder_heads": 3}})
    with pytest.raises(ConfigError, match=r"model\.decoder_heads=3 does not divide model\.decoder_dim=64"):
        check_model(cfg)


def test_grad_checkpointing_takes_bools_and_stage_lists():
    from greenmim.cli.validate import check_grad_checkpointing

    for good in ("true", "false", "[0,2]", "[]"):
        check_grad_checkpointing(OmegaConf.create(f"trainer: {{grad_checkpointing: {good}}}"))
    for bad in ("abc", "1", "[-1]", "[a]"):
        with pytest.raises(UserError, match="trainer.grad_checkpointing"):
            check_grad_checkpointing(OmegaConf.create(f"trainer: {{grad_checkpointing: {bad}}}"))


def test_every_shipped_model_config_passes_the_architecture_check():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from greenmim.cli.validate import check_model

    names = sorted(path.stem for path in (CONFIGS / "model").glob("greenmim_*.yaml"))  # simmim_* only add method=
    assert len(names) >= 10
    with initialize_config_module("greenmim.configs", version_base="1.3"):
        for name in names:
            check_model(hydra_compose("pretrain", [f"model={name}"]))


# ------------------------------------------------------------------ classification inputs
def test_single_class_is_refused_naming_the_folder(monkeypatch, capsys, two_classes, tmp_path):
    root = tmp_path / "one"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / split / "class0").symlink_to(two_classes / split / "class0")
    with pytest.raises(UserError, match=r"one/train has a single class folder \(class0\): a classifier needs at least 2 classes"):
        build_classification_data(compose(f"data.root={root}", "data.img_size=32").data, compose().aug)
    # a 1-image linear probe is such a dataset: one line, exit 2, before any feature is extracted
    (root / "train" / "class0").unlink()
    (root / "train" / "class0").mkdir()
    (root / "train" / "class0" / "0.jpg").symlink_to(two_classes / "train" / "class0" / "0.jpg")
    code, err = finetune_cli(monkeypatch, capsys, tmp_path / "run", "experiment=linear_probe", f"data.root={root}")
    assert_one_line(code, err, FT, r"single class folder \(class0\)")


def test_binary_val_labels_file_names_the_expected_format(monkeypatch, capsys, two_classes, tmp_path):
    root = tmp_path / "flat"
    (root / "val").mkdir(parents=True)
    (root / "train").symlink_to(two_classes / "train")
    (root / "val" / "a.jpg").symlink_to(two_classes / "val" / "class0" / "0.jpg")
    for name, payload in (("labels.bin", bytes(range(256)) * 4), ("labels.txt", b"a.jpg class0\x00\x01\x02")):
        (tmp_path / name).write_bytes(payload)
        code, err = finetune_cli(monkeypatch, capsys, tmp_path / "run", "experiment=finetune_quick", f"data.root={root}",
                                 f"data.val_labels={tmp_path / name}", TINY)
        assert_one_line(code, err, FT, rf"data\.val_labels=.*{name} is not a text file: expected UTF-8 text with one '<file name> <class")


# ------------------------------------------------------------------ top-5 only with more than 5 classes, everywhere
class Logits(torch.utils.data.Dataset):
    def __init__(self, num_classes, n=12):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, num_classes, generator=g), torch.randint(0, num_classes, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.mark.parametrize("num_classes", [2, 5, 6])
def test_top5_is_reported_only_with_more_than_5_classes(num_classes):
    from greenmim.tasks.frozen_eval.linear_probe import probe_metrics, LinearProbe
    from greenmim.tasks.frozen_eval.knn import topk_accuracy

    ds = Logits(num_classes)
    want = {"acc1", "acc5"} if num_classes > 5 else {"acc1"}
    ft = evaluate(torch.nn.Identity(), build_eval_loader(ds, 4, 0), torch.device("cpu"))
    assert {k for k in ft if k.startswith("acc")} == want
    assert set(topk_accuracy(ds.x, ds.y)) == want
    assert {k for k in probe_metrics(LinearProbe(num_classes, num_classes), ds.x, ds.y) if k.startswith("acc")} == want


def test_two_class_finetune_writes_no_top5(two_classes, tmp_path):
    from greenmim.cli.finetune import run

    out = tmp_path / "run"
    results = run(compose("experiment=finetune_quick", f"data.root={two_classes}", TINY, "data.img_size=64", "data.batch_size=2",
                          "data.num_workers=0", "trainer.epochs=1", "trainer.tensorboard=false", f"output_dir={out}"))
    assert "val_acc1" in results["last"] and "acc1" in results["best"]
    assert not any("acc5" in key for key in [*results["last"], *results["best"]])
    assert "acc5" not in (out / "metrics.jsonl").read_text() and "top-5" not in (out / "train.log").read_text()


# ------------------------------------------------------------------ the YAML is the one source of every default
def test_typed_configs_state_no_default_and_come_from_the_yaml():
    """TrainerConfig/OptimConfig restate nothing (a field without a value is an error); from_yaml
    gives the YAML's values (trainer/default.yaml, the root config's trainer recipe, optim/adamw.yaml)."""
    import dataclasses

    for cls in (TrainerConfig, OptimConfig):
        defaults = [f.name for f in dataclasses.fields(cls)
                    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
        assert not defaults, f"{cls.__name__} restates the YAML's defaults of {defaults}"
    with pytest.raises(TypeError):
        TrainerConfig(output_dir="x", epochs=1)
    trainer, optim = TrainerConfig.from_yaml(output_dir="x"), OptimConfig.from_yaml(blr=1e-3)
    for key, value in OmegaConf.load(CONFIGS / "trainer" / "default.yaml").items():
        if key not in ("device", "precision"):  # trainer=cpu sets them
            assert same(getattr(trainer, key), value), key
    pretrain = OmegaConf.load(CONFIGS / "pretrain.yaml")
    assert (trainer.output_dir, trainer.epochs, trainer.log_every, trainer.device) == ("x", pretrain.trainer.epochs, pretrain.trainer.log_every, "cpu")
    for key, value in OmegaConf.to_container(OmegaConf.load(CONFIGS / "optim" / "adamw.yaml")).items():
        assert same(getattr(optim, key), 1e-3 if key == "blr" else value), key
    # the Hydra-free reading the benchmark uses (a bare GPU machine has no Hydra) gives the same optimizer
    assert OptimConfig.from_group() == OptimConfig.from_yaml()
    assert OptimConfig.from_group("adamw_finetune") == OptimConfig.from_yaml("finetune")


def test_a_config_written_by_hand_names_what_it_lacks():
    from greenmim.engine.config import trainer_config
    from greenmim.engine.errors import ConfigError

    cfg = OmegaConf.create({"output_dir": "x", "resume": None, "seed": 0, "trainer": {"epochs": 1}})
    with pytest.raises(ConfigError, match=r"config key\(s\) trainer\.accum_steps, .* missing: compose the config from configs/"):
        trainer_config(cfg)


def same(a, b) -> bool:
    """Equal values, lists and tuples alike (``1 == 1.0`` counts, ``True == 1`` does not)."""
    a, b = (list(v) if isinstance(v, (list, tuple)) else v for v in (a, b))
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def test_function_defaults_equal_the_yaml():
    """The frozen-feature functions keep their library defaults (DINO's k-NN, MAE's probe); they are the YAML's."""
    cfg = compose()
    knn = inspect.signature(knn_scores).parameters
    assert (knn["k"].default, knn["temperature"].default) == (cfg.knn.k, cfg.knn.temperature)
    probe = inspect.signature(train_linear_probe).parameters
    for key in ("epochs", "batch_size", "weight_decay", "momentum", "warmup_epochs"):
        assert probe[key].default == cfg.probe[key], key
    assert probe["lr"].default == cfg.probe.blr * cfg.probe.batch_size / cfg.probe.base_batch


# ------------------------------------------------------------------ architecture overrides without "+"
def test_architecture_keys_override_without_plus():
    from greenmim.tasks.finetune.task import model_kwargs
    from greenmim.tasks.pretrain.task import build_pretrain_model

    ft = compose("model=greenmim_swin_tiny_w7", "model.encoder_args.embed_dim=16", "model.encoder_args.depths=[1,1,1,1]",
                 "model.encoder_args.num_heads=[1,1,2,2]", "model.encoder_args.window_size=2", "data.img_size=64")
    assert model_kwargs(ft) == dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2, img_size=64)
    twins = compose("model=greenmim_twins_svt_small", "model.encoder_args.depths=[1,1,1,1]", "model.encoder_args.wss=[2,2,2,2]")
    assert twins.model.encoder_args.depths == [1, 1, 1, 1] and twins.model.encoder_args.embed_dims is None
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("greenmim.configs", version_base="1.3"):
        pre = hydra_compose("pretrain", ["model=greenmim_swin_micro", "model.encoder_args.depths=[1,1,1,1]",
                                         "model.encoder_args.num_heads=[1,1,2,2]", "model.encoder_args.mlp_ratio=2.0"])
    model = build_pretrain_model(OmegaConf.to_container(pre.model), 64)
    assert len(model.encoder.layers) == 4 and model.encoder.layers[0].blocks[0].mlp.fc1.out_features == 64
    assert pre.model.encoder_args.drop_path_rate == 0.0  # the root config's value survives the declarations
