"""Shared helpers of the classification tests (fine-tuning, frozen-feature evaluation, the study
script): generated class folders, a tiny pretraining checkpoint, config composition. The fixtures
built on them (``folders``, ``pretrained``) are in ``conftest.py``."""
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from greenmim.models import create_pretrain_model

TINY = "model.encoder_args={embed_dim:16,depths:[1,1,1,1],num_heads:[1,1,2,2],window_size:2}"
TINY_KW = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2)
COLORS = [(200, 40, 40), (40, 40, 200), (40, 170, 40)]


def make_folders(root: Path, per_class=(6, 4), size=(40, 52), seed=0) -> Path:
    """3 classes of noisy solid colours: root/{train,val}/class{i}/*.jpg, plus one palette GIF in train."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for c, color in enumerate(COLORS):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = (np.array(color)[None, None] + rng.normal(0, 30, (*size, 3))).clip(0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i}.jpg")
    Image.fromarray(np.full((30, 30, 3), COLORS[0], np.uint8)).convert("P").save(root / "train" / "class0" / "palette.gif")
    return root


def write_pretrain_checkpoint(path: Path) -> Path:
    """A greenmim pretraining checkpoint of the TINY Swin in the trainer's layout (encoder.*, decoder.*)."""
    torch.manual_seed(0)
    model = create_pretrain_model("swin_tiny_patch4_window7_224", img_size=64, decoder_dim=32, decoder_heads=2, **TINY_KW)
    torch.save({"format": "greenmim-checkpoint", "version": 1, "model": model.state_dict(), "epoch": 1, "step": 1}, path)
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("greenmim.configs", version_base="1.3"):
        return hydra_compose("finetune", overrides=list(overrides))
