"""Hydra configs (data only); a package so that pkg:// search paths can name it."""
