"""Data files the tool reads at run time: class lists, the model registry, recipes, demo annotations.

They ship as package data, so an installed wheel finds them from any working
folder; code reads them through :func:`data_file`, never through a path
relative to the source tree.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def data_file(*parts: str) -> Path:
    """Path of a file (or folder) under ``data_manifests/``, wherever the package is installed."""
    return Path(str(files(__name__).joinpath(*parts)))
