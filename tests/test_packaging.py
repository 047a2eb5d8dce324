"""pyproject.toml lists its packages by hand (configs/ ships as greenmim.configs): none may be missing;
setup.py only hands over to it."""
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(meta["tool"]["setuptools"]["packages"])
    assert meta["tool"]["setuptools"]["package-dir"] == {"greenmim.configs": "configs"}
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "greenmim").rglob("__init__.py")}
    found |= {".".join(("greenmim",) + p.parent.relative_to(REPO).parts) for p in (REPO / "configs").rglob("__init__.py")}
    assert found == listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_version_comes_from_pyproject():
    import greenmim

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert greenmim.__version__ == meta["project"]["version"]


def test_setup_py_only_delegates_to_pyproject():
    """The top-level setup.py (for tools that call it) holds no metadata: exactly ``setup()``."""
    import ast

    tree = ast.parse((REPO / "setup.py").read_text())
    assert [ast.dump(node) for node in tree.body] == [
        ast.dump(ast.parse("from setuptools import setup").body[0]),
        ast.dump(ast.parse("setup()").body[0]),
    ]
