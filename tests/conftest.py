import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# A Swin small enough for CPU tests, with two blocks per stage so every stage has a shifted block.
TINY_SWIN = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4))
SWIN_NAME = "swin_tiny_patch4_window7_224"

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def hymenoptera():
    root = SHARED_DATA / "hymenoptera"
    if not root.is_dir():
        pytest.skip("../shared/data/hymenoptera is absent")
    return root
