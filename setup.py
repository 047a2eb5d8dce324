# Compatibility shim for tools that still call `python setup.py ...`: every piece of metadata, the
# version, the dependencies and the package list live in pyproject.toml; this only hands over to it.
from setuptools import setup

setup()
