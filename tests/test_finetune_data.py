"""Fine-tuning data: class folders, flat ILSVRC validation, mixup/loss, exact sharded evaluation, clear errors."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import yaml_node

from greenmim.data.images import CorruptImageError, DataError
from greenmim.engine.errors import ConfigError
from greenmim.tasks.finetune.data import build_classification_data, build_mixup, build_train_criterion
from greenmim.tasks.finetune.evaluate import ShardSampler, build_eval_loader, evaluate


def write(path, color=(10, 200, 30), size=(20, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), color, np.uint8)).save(path)


def folders(root, classes=("a", "b"), val_classes=None, n=2):
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for c in names:
            for i in range(n):
                write(root / split / c / f"{i}.png")
    return root


def build(data_cfg, **kw):
    return build_classification_data(data_cfg, OmegaConf.create(yaml_node("finetune", "aug")), **kw)


def cfg(root, **kw):
    return OmegaConf.create(yaml_node("finetune", "data", root=None if root is None else str(root), img_size=32, **kw))


def test_class_folders_and_val_mapping(tmp_path):
    data = build(cfg(folders(tmp_path, ("a", "b", "c"), val_classes=("b", "c"))))
    assert data.classes == ["a", "b", "c"] and data.num_classes == 3
    assert sorted(set(data.val.targets)) == [1, 2]  # val follows the train mapping
    x, y = data.train[0]
    assert x.shape == (3, 32, 32) and y == 0


def test_flat_ilsvrc_val_with_label_file(tmp_path):
    folders(tmp_path, ("n01", "n02"))
    flat = tmp_path / "flat"
    for i, label in enumerate(["n02", "n01", "1"]):
        write(flat / f"ILSVRC2012_val_{i:08d}.JPEG")
    (tmp_path / "labels.txt").write_text("ILSVRC2012_val_00000000.JPEG n02\nILSVRC2012_val_00000001 n01\nILSVRC2012_val_00000002.JPEG 1\n")
    data = build(cfg(tmp_path, val_split="flat", val_labels=str(tmp_path / "labels.txt")))
    assert data.val.targets == [1, 0, 1]
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000000,n01 1 2 3 4\nILSVRC2012_val_00000001,n02 1 2 3 4\nILSVRC2012_val_00000002,n02 5 6 7 8\n")
    data = build(cfg(tmp_path, val_split="flat", val_labels=str(tmp_path / "LOC_val_solution.csv")))
    assert data.val.targets == [0, 1, 1]


def test_errors_name_the_fix(tmp_path):
    root = folders(tmp_path / "ok")
    with pytest.raises(ConfigError, match="data.num_classes=3 but .* 2 class folders; set data.num_classes=2"):
        build(cfg(root, num_classes=3))
    with pytest.raises(ConfigError, match="data.root is not set"):
        build(cfg(None))
    (root / "train" / "empty").mkdir()
    with pytest.raises(DataError, match="without images .*: empty; add images or delete"):
        build(cfg(root))
    bad = folders(tmp_path / "bad", ("a", "b"), val_classes=("a", "zzz"))
    with pytest.raises(DataError, match="class folders that the train split lacks: zzz"):
        build(cfg(bad))
    with pytest.raises(DataError, match="train/train does not exist: data.root must be the folder holding train/"):
        build(cfg(tmp_path / "bad" / "train"))


def test_unreadable_images(tmp_path):
    root = folders(tmp_path)
    (root / "train" / "a" / "broken.jpg").write_bytes(b"not an image")
    (root / "val" / "b" / "broken.jpg").write_bytes(b"not an image")
    data = build(cfg(root, on_corrupt="skip"))
    i = data.train.paths.index(str(root / "train" / "a" / "broken.jpg"))
    x, y = data.train[i]  # skipped: the next readable image, with its own label
    assert x.shape == (3, 32, 32) and y == data.train.targets[(i + 1) % len(data.train)]
    j = data.val.paths.index(str(root / "val" / "b" / "broken.jpg"))
    with pytest.raises(CorruptImageError, match="broken.jpg .*remove or replace the file"):
        data.val[j]  # validation never skips: accuracies stay exact
    data = build(cfg(root, on_corrupt="error"))
    with pytest.raises(CorruptImageError):
        data.train[i]


def test_palette_gif_of_hymenoptera(hymenoptera):
    data = build(cfg(hymenoptera), need_train=True)
    assert data.classes == ["ants", "bees"] and len(data.train) == 245 and len(data.val) == 153
    i = data.train.paths.index(str(hymenoptera / "train" / "ants" / "imageNotFound.gif"))
    x, y = data.train[i]
    assert x.shape == (3, 32, 32) and y == 0


def test_mixup_and_losses():
    aug = OmegaConf.create(yaml_node("finetune", "aug", mixup=0.8, cutmix=1.0, smoothing=0.1))
    mixup = build_mixup(aug, num_classes=4)
    x, y = mixup(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert y.shape == (4, 4) and torch.allclose(y.sum(1), torch.ones(4)) and y.min() >= 0.1 / 4 - 1e-6
    assert type(build_train_criterion(mixup, 0.1)).__name__ == "SoftTargetCrossEntropy"
    assert build_mixup(OmegaConf.create(yaml_node("finetune", "aug", mixup=0.0, cutmix=0.0)), 4) is None
    assert type(build_train_criterion(None, 0.1)).__name__ == "LabelSmoothingCrossEntropy"


def test_sharded_evaluation_is_exact():
    n, world = 11, 3
    shards = [list(ShardSampler(n, world, r)) for r in range(world)]
    assert sorted(sum(shards, [])) == list(range(n))  # every sample once, no padding

    class Table(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x, self.y = torch.randn(n, 7, generator=g), torch.randint(0, 7, (n,), generator=g)  # > 5 classes: top-5 reported

        def __len__(self):
            return n

        def __getitem__(self, i):
            return self.x[i], self.y[i]

    ds, model = Table(), torch.nn.Identity()
    whole = evaluate(model, build_eval_loader(ds, 4, 0), torch.device("cpu"))
    parts = [evaluate(model, build_eval_loader(ds, 4, 0, r, world), torch.device("cpu")) for r in range(world)]
    # what the all-reduce of the per-rank sums computes
    count = sum(p["count"] for p in parts)
    assert count == n
    for key in ("loss", "acc1", "acc5"):
        assert sum(p[key] * p["count"] for p in parts) / count == pytest.approx(whole[key])
    logits_top1 = (ds.x.argmax(1) == ds.y).float().mean().item() * 100
    assert whole["acc1"] == pytest.approx(logits_top1)


def test_randaugment_posterize_at_top_magnitude():
    """m9-mstd0.5 reaches magnitude 10 -> 0 bits kept; Pillow >= 11 rejects that, greenmim restores a black image."""
    from timm.data.auto_augment import AugmentOp

    from greenmim.tasks.finetune.compat import patch_timm_posterize

    patch_timm_posterize()  # what building a RandAugment transform does (independent of test order)

    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    assert op(Image.new("RGB", (4, 4), (200, 100, 50))).getpixel((0, 0)) == (0, 0, 0)
