"""YAML files of settings (prune recipes, fine-tune recipes, evaluation configs), read one way:
``yaml.safe_load`` only, with one-line errors for a missing file, malformed YAML, or a top level that is not a mapping.
Imports nothing heavy (the recipe reads its file with it before any model loads)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import PrunekitError


def load_yaml(path: str | os.PathLike, what: str = "recipe") -> dict[str, Any]:
    """A YAML mapping from ``path`` (``yaml.safe_load``: no Python tags), or a one-line error."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PrunekitError(f"{what} {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.constructor.ConstructorError as err:
        raise PrunekitError(
            f"{what} {str(path)!r} uses a YAML tag prunekit does not load ({_mark(err)}): recipes "
            "are plain data; remove the tag"
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise PrunekitError(f"{what} {str(path)!r} is not valid YAML ({_mark(err)}); fix the file") from None
    if not isinstance(data, dict):
        raise PrunekitError(
            f"{what} {str(path)!r} must be a YAML mapping of settings (key: value), not a {type(data).__name__}"
        )
    return data


def _mark(err: Exception) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or type(err).__name__
    return f"{problem} at line {mark.line + 1}" if mark is not None else str(problem)
