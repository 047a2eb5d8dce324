import copy
import functools
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# A Swin small enough for CPU tests, with two blocks per stage so every stage has a shifted block.
TINY_SWIN = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4))
SWIN_NAME = "swin_tiny_patch4_window7_224"
# tiny pretraining models for step-level tests (hot path, static plans)
TINY_TWINS = dict(
    img_size=(96, 128), embed_dims=(16, 24, 32, 40), num_heads=(1, 2, 2, 4), mlp_ratios=(2, 2, 2, 2),
    depths=(2, 1, 2, 1), wss=(4, 4, 2, 1),
)
TINY_PVT_V2 = dict(img_size=(96, 128), embed_dims=(16, 16, 32, 32), num_heads=(1, 1, 2, 2), mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 1, 1))
MODELS = {
    "swin": (SWIN_NAME, dict(TINY_SWIN, img_size=224)),
    "twins": ("twins_svt_small", TINY_TWINS),
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=128, window_size=4, embed_dim=16, depths=(2, 1, 1, 1), num_heads=(1, 1, 2, 2))),
    "pvt_v2": ("pvt_v2_b0", TINY_PVT_V2),
}


def tiny_model(kind, **kw):
    """A seeded tiny pretraining model, kind 'swin', 'twins', 'swinv2' or 'pvt_v2'; ``kw`` go to create_pretrain_model."""
    from greenmim.models import create_pretrain_model

    name, cfg = MODELS[kind]
    torch.manual_seed(0)
    return create_pretrain_model(name, decoder_dim=32, decoder_heads=2, **cfg, **kw)

@functools.lru_cache(maxsize=None)
def _composed(task, overrides):
    from greenmim.engine.config import compose, to_dict

    return to_dict(compose(task, *overrides))


def yaml_node(task, node, *overrides, **fields):
    """The ``node`` (``"data"``, ``"aug"``, ``"model"``, ...) of the ``task`` root config composed from
    configs/ with ``overrides`` (e.g. ``"data=synthetic"``), as a plain dict with ``fields`` replaced:
    a complete config for a library call, its defaults read from the YAML instead of restated here."""
    return copy.deepcopy({**_composed(task, tuple(overrides))[node], **fields})


# Real photos used where present (the shared folder next to the checkout); tests that need them skip otherwise.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HYMENOPTERA = SHARED_DATA / "hymenoptera"

# greenmim-pretrain overrides for a micro Swin at 64 px: 4 units of 32 px, one visible at mask ratio 0.75.
TINY_PRETRAIN_ARGS = [
    "model=greenmim_swin_micro", "model.encoder_args.embed_dim=16", "model.encoder_args.depths=[1,1,1,1]",
    "model.encoder_args.num_heads=[1,1,2,2]", "model.decoder_dim=32", "model.decoder_heads=2",
    "data.img_size=64", "data.batch_size=4", "trainer.log_every=1", "vis.every_epochs=1", "vis.num_images=3",
]


@pytest.fixture(autouse=True)
def fresh_greenmim_logger():
    """After each test, the ``greenmim`` logger as a new process has it: a test's ``setup_logging``
    binds a handler to that test's captured stdout, which is closed once the test ends; a later
    INFO line (start-up, progress) through it would print a logging error into the next test's stderr."""
    yield
    import logging

    logger = logging.getLogger("greenmim")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate, logger.level = True, logging.NOTSET


@pytest.fixture
def hymenoptera() -> Path:
    """``../shared/data/hymenoptera`` (ImageNet layout: train/ and val/ with ants/ and bees/), or skip."""
    if not HYMENOPTERA.is_dir():
        pytest.skip("../shared/data/hymenoptera is absent")
    return HYMENOPTERA


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Generated 3-class folders (see ``finetune_helpers.make_folders``)."""
    from finetune_helpers import make_folders

    return make_folders(tmp_path_factory.mktemp("cls"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny greenmim pretraining checkpoint (see ``finetune_helpers.write_pretrain_checkpoint``)."""
    from finetune_helpers import write_pretrain_checkpoint

    return write_pretrain_checkpoint(tmp_path_factory.mktemp("pre") / "pretrain.pt")
