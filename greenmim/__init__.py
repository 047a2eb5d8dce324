"""greenmim: masked image modeling for hierarchical vision transformers on visible patches only."""
from importlib.metadata import PackageNotFoundError, version

try:  # the version is set in one place, pyproject.toml
    __version__ = version("greenmim")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
