"""The README's Python examples run as written (issue 22, item 4).

Every ```python block of README.md is extracted and executed, in order, each in a fresh namespace.
Convention for the sizes a block leaves to the reader: the blocks name real models (Swin-B), which
are too slow for CPU tests, so while they run, :data:`TINY` is merged into the keyword arguments of
``greenmim.models.create_encoder`` / ``create_pretrain_model`` and ``timm.create_model``: narrower
and shallower stages, everything else (names, ``window_size``, image size, batch, masks) as written.
A block that builds two models with different overrides (e.g. an encoder with ``window_size=14``
loaded into a window-7 timm model) still fails here, as it would for a user.
"""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
#: architecture arguments the test merges into every model the README builds (timm's Swin keys)
TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
#: and into every pretraining model (its decoder)
TINY_DECODER = dict(decoder_dim=32, decoder_heads=2)


def python_blocks(text: str):
    """The ``(first line number, code)`` of every fenced ```python block of ``text``."""
    blocks = []
    for m in re.finditer(r"^```python[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        blocks.append((text.count("\n", 0, m.start()) + 2, m.group(1)))
    return blocks


def test_readme_has_python_blocks():
    assert len(python_blocks(README.read_text(encoding="utf-8"))) >= 1


@pytest.fixture
def tiny_models(monkeypatch):
    """``create_encoder``, ``create_pretrain_model`` and ``timm.create_model`` with :data:`TINY` merged in."""
    import timm

    import greenmim.models as models

    def tiny(fn, extra=None):
        def build(name, *args, **kwargs):
            return fn(name, *args, **{**kwargs, **TINY, **(extra or {})})
        return build

    monkeypatch.setattr(models, "create_encoder", tiny(models.create_encoder))
    monkeypatch.setattr(models, "create_pretrain_model", tiny(models.create_pretrain_model, TINY_DECODER))
    monkeypatch.setattr(timm, "create_model", tiny(timm.create_model))


@pytest.mark.parametrize("index", range(len(python_blocks(README.read_text(encoding="utf-8")))))
def test_readme_python_block_runs(index, tiny_models):
    line, code = python_blocks(README.read_text(encoding="utf-8"))[index]
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": f"readme_block_{index}"})
