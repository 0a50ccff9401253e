"""Labeled text for classifiers: a ``.jsonl`` file of ``{"text": "...", "label": 2}`` lines (or the label's name,
``"label": "positive"``, as the model's config.json ``label2id`` spells it). Lines without a ``label`` make an
unlabeled set, which is scored by agreement with the dense model instead of accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import PrunekitError
from .jsonl import read_jsonl


def is_jsonl(source: str | None) -> bool:
    return source is not None and Path(str(source)).suffix.lower() == ".jsonl"


def read_examples(path: str, what: str) -> tuple[list[str], list[Any] | None]:
    """The texts and, when every line has one, the labels (some lines with and some without is an error)."""
    records = read_jsonl(Path(path).expanduser(), {"text": str}, what)
    with_label = sum("label" in r for r in records)
    if 0 < with_label < len(records):
        raise PrunekitError(
            f'{what} {path!r}: {with_label} of {len(records)} lines have a "label"; label every line (accuracy) '
            "or none (agreement with the dense model)"
        )
    return [r["text"] for r in records], [r["label"] for r in records] if with_label else None


def label_ids(labels: list[Any], config: Any, what: str) -> torch.Tensor:
    """Labels as class indices of the model: integers in ``[0, num_labels)`` or names from ``label2id``."""
    names = dict(getattr(config, "label2id", None) or {})
    count = getattr(config, "num_labels", None) or len(names)
    ids = []
    for label in labels:
        index = names.get(label) if isinstance(label, str) else label
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            known = f"0..{count - 1}" + (f" or {', '.join(map(str, names))}" if names else "")
            raise PrunekitError(f"{what}: label {label!r} is not one of the model's {count} classes ({known})")
        ids.append(index)
    return torch.tensor(ids, dtype=torch.long)


def tokenize_examples(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Each text as the model's tokenizer encodes one example (special tokens included), cut to ``max_length``."""
    ids = tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False)["input_ids"]
    empty = next((i for i, sequence in enumerate(ids) if not sequence), None)
    if empty is not None:
        raise PrunekitError(f"example {empty + 1} ({texts[empty][:40]!r}) has no tokens; remove it or give it text")
    return ids
