"""Files shipped inside installed packages (model weights, photos, test corpora): their folder is located through
the import system's spec, without importing the package (some packages' `__init__` pull in heavy or deliberately
missing dependencies, ASSETS.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(package: str) -> Path | None:
    """The folder of the installed package `package`, or None when it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])
