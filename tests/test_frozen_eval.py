"""Frozen-feature evaluation: DINO k-NN, MAE linear probe, and their greenmim-finetune runs
(``protocol=knn|linear_probe``) in one process, under torchrun, and on the hymenoptera photos."""
import json
import os
import subprocess
import sys

import pytest
import torch

from greenmim.tasks.frozen_eval import knn_scores, topk_accuracy, train_linear_probe
from greenmim.tasks.frozen_eval.features import gather_in_order
from finetune_helpers import TINY, compose, make_folders, read_jsonl


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_folders(tmp_path_factory.mktemp("frozen"), per_class=(6, 4))


def blobs(n_per_class, num_classes, dim=16, spread=0.05, seed=0):
    """Features around orthogonal class directions: perfectly separable by cosine similarity."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    centers = torch.eye(dim)[:num_classes] * 3.0
    return centers[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


# -- k-NN ---------------------------------------------------------------------------------------------
def test_knn_separable_features_give_100_percent():
    train_x, train_y = blobs(30, 6, seed=0)
    val_x, val_y = blobs(10, 6, seed=1)
    acc = topk_accuracy(knn_scores(train_x, train_y, val_x, 6, k=20, temperature=0.07), val_y)
    assert acc == {"acc1": 100.0, "acc5": 100.0}


def test_knn_shuffled_labels_give_chance():
    train_x, train_y = blobs(250, 4, seed=0)
    val_x, val_y = blobs(250, 4, seed=1)
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))]
    acc = topk_accuracy(knn_scores(train_x, shuffled, val_x, 4), val_y)["acc1"]
    assert 25.0 - 6 < acc < 25.0 + 6  # chance 25%, sd of the mean ~1.4%


def test_knn_votes_are_temperature_weighted_cosines():
    train = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # scale does not matter: cosine similarity
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[2.0, 0.2]])
    scores = knn_scores(train, labels, query, num_classes=3, k=2, temperature=0.5)
    cos = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    expected = torch.tensor([[(cos[0, 0] / 0.5).exp(), (cos[0, 2] / 0.5).exp(), 0.0]])  # neighbours 0 and 2
    assert torch.allclose(scores, expected)
    assert knn_scores(train, labels, query, 3, k=50).shape == (1, 3)  # k is clipped to the train set


def test_topk_accuracy_reports_top5_only_with_more_than_5_classes():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    assert topk_accuracy(scores, torch.tensor([0, 0])) == {"acc1": 50.0}
    assert set(topk_accuracy(torch.randn(4, 6), torch.zeros(4, dtype=torch.long))) == {"acc1", "acc5"}


def test_gather_in_order_is_identity_in_one_process():
    x = torch.arange(12.0).view(6, 2)
    assert torch.equal(gather_in_order(x, 6), x)


# -- linear probe -------------------------------------------------------------------------------------
def test_linear_probe_learns_separable_features():
    train_x, train_y = blobs(40, 3, seed=0)
    val_x, val_y = blobs(10, 3, seed=1)
    seen = []
    probe, history = train_linear_probe(train_x, train_y, val_x, val_y, 3, epochs=8, batch_size=30, lr=0.1, warmup_epochs=1,
                                        on_epoch=lambda e, row: seen.append(e))
    assert seen == list(range(1, 9)) and history[-1]["val_acc1"] == 100.0
    assert not any(p.requires_grad for p in probe.norm.parameters())  # BatchNorm without affine
    again, history2 = train_linear_probe(train_x, train_y, val_x, val_y, 3, epochs=8, batch_size=30, lr=0.1, warmup_epochs=1)
    assert history2 == history  # deterministic given the features and the seed


def test_linear_probe_run_leaves_encoder_bit_identical(folders, pretrained, tmp_path, monkeypatch):
    """End to end (greenmim-finetune's run): the encoder after the probe equals the checkpoint's encoder."""
    from greenmim.cli.finetune import run
    from greenmim.tasks.frozen_eval import run as frozen
    from greenmim.weights.loading import load_pretrained
    from greenmim.tasks.finetune.model import create_classifier

    built = {}
    original = frozen.build_frozen_encoder

    def capture(cfg, num_classes):
        model, report = original(cfg, num_classes)
        built["model"] = model
        return model, report

    monkeypatch.setattr(frozen, "build_frozen_encoder", capture)
    out = tmp_path / "probe"
    res = run(compose("experiment=linear_probe", f"data.root={folders}", f"output_dir={out}", f"pretrained={pretrained}",
                      "data.img_size=64", "data.num_workers=0", "probe.epochs=5", "probe.batch_size=8", TINY))
    ref, _ = create_classifier("swin_tiny_patch4_window7_224", 3, img_size=64, embed_dim=16, depths=(1, 1, 1, 1),
                               num_heads=(1, 1, 2, 2), window_size=2)
    load_pretrained(ref, str(pretrained))
    after = built["model"].state_dict()
    expected = {k: v for k, v in ref.state_dict().items() if not k.startswith("head.fc.")}
    assert after.keys() == expected.keys()
    assert all(torch.equal(after[k], expected[k]) for k in expected)
    assert not any(p.requires_grad for p in built["model"].parameters())
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "probe/val_acc1" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"] == res["metrics"] and set(res["metrics"]) == {"acc1"}  # 3 classes: no top-5
    assert saved["load_report"]["kind"] == "greenmim-pretrain" and saved["train_images"] == 19 and saved["val_images"] == 12


# -- through the CLI ------------------------------------------------------------------------------------
def run_cli(args, tmp_path, torchrun=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [sys.executable]
    proc = subprocess.run([*launcher, "-m", "greenmim.cli.finetune", *args], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_cli_knn_under_torchrun_matches_one_process(folders, pretrained, tmp_path):
    """``greenmim-finetune experiment=knn``: 19 train / 12 val images; two ranks gather the same features."""
    from greenmim.cli.finetune import run

    common = ["experiment=knn", f"data.root={folders}", f"pretrained={pretrained}", "data.img_size=64", "data.batch_size=5",
              "data.num_workers=0", TINY]
    run(compose(*common, f"output_dir={tmp_path / 'one'}"))
    run_cli([*common, f"output_dir={tmp_path / 'two'}"], tmp_path, torchrun=True)
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert one["protocol"] == "knn" and one["train_images"] == 19 and one["val_images"] == 12
    assert one["metrics"] == two["metrics"] and one["settings"] == {"k": 20, "temperature": 0.07}
    assert one["majority_acc1"] == pytest.approx(100 / 3)
    rows = read_jsonl(tmp_path / "one" / "metrics.jsonl")
    assert rows == [{"step": 0, "knn/acc1": one["metrics"]["acc1"]}]


def test_knn_random_init_on_hymenoptera(hymenoptera, tmp_path):
    """The real photos (JPEGs and a palette GIF), random initialisation: all 245 / 153 images get features."""
    from greenmim.cli.finetune import run

    res = run(compose("experiment=knn", f"data.root={hymenoptera}", f"output_dir={tmp_path}", "data.img_size=64",
                      "data.num_workers=0", "pretrained=null", TINY))
    assert res["train_images"] == 245 and res["val_images"] == 153 and res["num_classes"] == 2
    assert res["majority_acc1"] == pytest.approx(100 * 83 / 153) and 0 <= res["metrics"]["acc1"] <= 100


def test_small_data_and_frozen_recipes_compose():
    ft = compose("experiment=finetune_small_data", "data.root=/x")
    assert ft.protocol == "finetune" and ft.aug.mixup == 0 and ft.aug.cutmix == 0 and ft.model.name == "swin_tiny_patch4_window7_224"
    assert compose("experiment=knn").protocol == "knn" and compose("experiment=linear_probe").probe.blr == 0.1
