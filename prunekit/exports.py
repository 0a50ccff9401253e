"""Packages that export names imported on first use (PEP 562), so importing the package loads nothing heavy:
``prunekit`` (no torch for ``prunekit --help``), ``prunekit.io`` and ``prunekit.finetune`` (no Lightning for the
recipe the CLI reads)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module ``__getattr__`` and ``__dir__`` for ``package`` that import ``name`` from ``.exports[name]`` the
    first time it is asked for (and keep it in the package's namespace)."""

    def getattr_(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def dir_() -> list[str]:
        return sorted(exports)

    return getattr_, dir_
