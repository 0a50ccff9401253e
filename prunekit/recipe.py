"""Recipes: one frozen dataclass per job, parsed from YAML (``yaml.safe_load``) and CLI flags in one place.

Unknown keys are errors (a typo must not silently fall back to a default); the resolved recipe is saved
next to the outputs so a run can be repeated exactly.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class PruneRecipe:
    """Everything ``prunekit prune`` does. Field names are the CLI's long flags with underscores."""

    model: str
    out: str | None = None
    method: str = "wanda"
    method_params: dict = field(default_factory=dict)
    update: str | list | None = None
    update_params: dict = field(default_factory=dict)
    sparsity: float = 0.5
    pattern: str | None = None
    group: str | None = None
    allocation: str = "uniform"
    allocation_params: dict = field(default_factory=dict)
    include: list = field(default_factory=list)
    exclude: list = field(default_factory=list)
    layer_types: list = field(default_factory=lambda: ["linear"])
    calib_data: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 8
    sequential: bool = True
    device: str | None = None
    dtype: str = "auto"
    eval_data: str | None = None
    eval_seqlen: int | None = None
    eval_batch_size: int = 8
    recalibrate_bn: bool | None = None
    num_workers: int = 0
    lazy: bool = False
    offload_activations: str = "auto"
    save_format: str = "dense"
    overwrite: bool = False
    trust_remote_code: bool = False


def field_names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def recipe_from_dict(cls, data: dict[str, Any], source: str = "recipe"):
    """Build ``cls`` from a mapping, rejecting unknown keys with the list of known ones."""
    if not isinstance(data, dict):
        raise ValueError(f"{source} must be a YAML mapping of settings, got {type(data).__name__}")
    unknown = sorted(set(data) - field_names(cls))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {source}; known keys: {', '.join(sorted(field_names(cls)))}")
    missing = [f.name for f in fields(cls) if f.name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{source} is missing required key(s) {missing}")
    return cls(**data)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    return data


def load_recipe(cls, path: str | os.PathLike | None, overrides: dict[str, Any]):
    """Recipe from YAML (if given) with CLI ``overrides`` (only flags the user actually set) on top."""
    data = load_yaml(path) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return recipe_from_dict(cls, data, source=str(path) if path else "command line")


def dump_recipe(recipe, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))
