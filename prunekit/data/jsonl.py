"""JSON Lines records (one JSON object a line) for the data formats that pair text with something: a label
(``{"text": ..., "label": ...}``) or an image (``{"image": ..., "text": ...}``). Read and checked whole, before any
weights load, so a typo on line 900 costs a second and names the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import PrunekitError
from .text import read_utf8


def read_jsonl(path: Path, required: dict[str, type | tuple[type, ...]], what: str) -> list[dict[str, Any]]:
    """Every record of ``path``, each an object holding the ``required`` keys with values of their types; blank
    lines are skipped. ``what`` names the data in errors (``--calib-data``)."""
    records = []
    for number, line in enumerate(read_utf8(path, what).splitlines(), start=1):
        if line.strip():
            records.append(_record(line, required, f"{what} {str(path)!r} line {number}"))
    if not records:
        raise PrunekitError(f"{what} {str(path)!r} holds no records; give one JSON object a line")
    return records


def _record(line: str, required: dict[str, type | tuple[type, ...]], where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise PrunekitError(f"{where} is not valid JSON ({err.msg}); give one JSON object a line") from None
    keys = ", ".join(f'"{k}"' for k in required)
    if not isinstance(record, dict):
        raise PrunekitError(f"{where} is a {type(record).__name__}, not an object with the keys {keys}")
    for key, kind in required.items():
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):  # JSON true is no label and no path
            raise PrunekitError(f"{where} needs {_describe(key, kind)}; every record holds the keys {keys}")
    return record


def _describe(key: str, kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer"}
    return f'"{key}": ' + " or ".join(names.get(k, k.__name__) for k in kinds)
