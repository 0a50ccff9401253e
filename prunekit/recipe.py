"""Recipes: the job around a ``PruneConfig`` (model, data, outputs), parsed from YAML and CLI flags in one place.

A recipe is a ``PruneConfig`` with the job's fields added, so its keys are the config's settings plus these,
one flat YAML mapping. Unknown keys are errors (a typo must not silently fall back to a default); the
resolved recipe is saved next to the outputs so a run can be repeated exactly. Remote code can be enabled
only on the command line (or in Python), never by a recipe file alone.

One loader (``load_yaml``) serves prune, fine-tune and evaluation configs: ``yaml.safe_load`` only, with
one-line errors for a missing file, malformed YAML, or a top level that is not a mapping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from .config import PruneConfig, setting
from .errors import PrunekitError
from .model_classes import AUTO, MODEL_CLASSES, check_choice

SAVE_FORMATS = ("dense", "compact")
SCAN_PARTS = ("blocks", "kinds")  # what one sensitivity trial prunes (prunekit.sensitivity)


@dataclass(frozen=True)
class PruneRecipe(PruneConfig):
    """Everything ``prunekit prune`` does. Field names are the CLI's long flags with underscores."""

    model: str | None = setting(
        None, "local checkpoint directory or hub id; timm:NAME, local-dir:PATH, torchvision:NAME for image models"
    )
    model_class: str = setting(
        AUTO,
        "how a Hugging Face checkpoint loads: auto (from architectures in its config.json) or "
        + "; ".join(f"{name}: {row.what}" for name, row in MODEL_CLASSES.items()),
    )
    out: str | None = setting(None, "output directory (claimed at the start, written atomically; never an input)")
    calib_data: str | None = setting(
        None,
        "calibration text file / dataset (text models), ImageFolder (image models) or image-text folder with "
        "data.jsonl (vision-language models)",
    )
    eval_data: str | None = setting(
        None,
        "held-out data, evaluated before and after: text (perplexity; classifiers: agreement), labeled .jsonl "
        "(classifier accuracy), ImageFolder (top-1/top-5) or image-text folder",
    )
    eval_seqlen: int | None = setting(None, "tokens per evaluation window (default: seqlen)", type=int)
    eval_batch_size: int = setting(8, "evaluation batch size", type=int)
    num_workers: int = setting(0, "image loading workers (calibration and evaluation)", type=int)
    skip_bad_images: bool = setting(
        False,
        "skip unreadable images in the image folders (counted in the log) instead of failing on the first one",
        type=bool,
    )
    lazy: bool = setting(
        False, "HF checkpoints larger than memory: read, prune and write one block at a time", type=bool
    )
    save_format: str = setting(
        "dense",
        "dense (from_pretrained layout) or compact (kept values + bitmask / 2:4 "
        "packing; `prunekit convert --to dense` restores)",
    )
    overwrite: bool = setting(False, "replace a non-empty --out (at the very end, atomically)", type=bool)
    report_json: str | None = setting(None, "also write the prune report to this JSON file", flag="--json")
    trust_remote_code: bool = setting(
        False, "run the checkpoint's own Python code (command line only, never from a recipe)", type=bool, recipe=False
    )
    target: str | None = setting(
        None,
        "quality target: the highest sparsity (structured: ratio) whose model keeps it, e.g. 'ppl<=+10%' (relative "
        "to dense), 'ppl<=60', 'top1>=0.98'; measured on --eval-data (else on --holdout calibration samples); "
        "--sparsity is the first trial",
    )
    target_trials: int = setting(8, "most prune + evaluate trials a --target search runs", type=int)
    holdout: int = setting(
        64,
        "calibration samples (text windows / images) held out, never calibrated on, to measure --target or a "
        "sensitivity scan when no --eval-data is given",
        type=int,
    )

    # Whether the job measures quality without a --target (a sensitivity scan): then --holdout applies.
    measures_quality: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_job(self)


def check_job(recipe: PruneRecipe) -> None:
    """The job's own checks (the prune settings were checked by ``PruneConfig``)."""
    if not recipe.model:
        raise PrunekitError("no model given: pass --model PATH_OR_HUB_ID (or model: in the recipe)")
    check_choice(recipe.model_class)
    if recipe.save_format not in SAVE_FORMATS:
        raise PrunekitError(f"unknown save_format {recipe.save_format!r}; choose from {', '.join(SAVE_FORMATS)}")
    if recipe.eval_seqlen is not None and recipe.eval_seqlen < 1:
        raise PrunekitError(f"eval_seqlen must be a positive integer, got {recipe.eval_seqlen!r}")
    _check_quality(recipe)
    if recipe.lazy:
        _check_lazy(recipe)


def _check_quality(recipe: PruneRecipe) -> None:
    """--target and what measures it: the bound parsed, the search's limits, and settings it cannot vary."""
    from .target import parse_bound

    for name in ("target_trials", "holdout"):
        if getattr(recipe, name) < 1:
            raise PrunekitError(f"{name} must be a positive integer, got {getattr(recipe, name)!r}")
    unused = [
        f"--{name.replace('_', '-')}"
        for name, used in (
            ("target_trials", recipe.target is not None),
            ("holdout", (recipe.target is not None or recipe.measures_quality) and not recipe.eval_data),
        )
        if not used and getattr(recipe, name) != PruneRecipe.__dataclass_fields__[name].default
    ]
    if unused:
        raise PrunekitError(
            f"{' and '.join(unused)}: only for a --target search (--holdout: also a sensitivity scan) measured "
            "without --eval-data; drop it"
        )
    if recipe.target is None:
        return
    parse_bound(recipe.target)
    if recipe.pattern is not None:
        raise PrunekitError("--target searches the sparsity; an N:M pattern fixes it: drop --pattern (or --target)")
    if recipe.allocation == "explicit" and not recipe.allocation_params.get("normalize"):
        raise PrunekitError(
            "--target tries several sparsities, but explicit sparsities fix one; set --allocation-param "
            "normalize=true to rescale them to each trial's sparsity"
        )
    if not recipe.eval_data and not recipe.calib_data:
        raise PrunekitError("--target needs data to measure on: --eval-data, or --calib-data to hold samples out of")


def _check_lazy(recipe: PruneRecipe) -> None:
    problems = [
        what
        for what, bad in (
            ("--out (lazy pruning writes the checkpoint block by block)", not recipe.out),
            ("allocation uniform", recipe.allocation != "uniform"),
            ("no --eval-data (evaluate the output afterwards with `prunekit eval ppl`)", bool(recipe.eval_data)),
            ("an unstructured method", recipe.structured),
            ("a group other than global", recipe.group == "global"),
            ("sequential calibration", not recipe.sequential),
            ("no --target (search in memory, then prune the found sparsity with --lazy)", recipe.target is not None),
        )
        if bad
    ]
    if problems:
        raise PrunekitError(f"--lazy needs {'; '.join(problems)}")


@dataclass(frozen=True)
class SensitivityRecipe(PruneRecipe):
    """``prunekit sensitivity``: the prune settings of the scan's method, the scan's own, and the job."""

    sparsities: tuple = setting((0.5, 0.7, 0.9), "sparsities each part is pruned to, alone (repeatable)", repeat=True)
    parts: str = setting(
        "blocks",
        "what one trial prunes: blocks (decoder layers, ViT blocks, CNN stages), or kinds (each kind of layer within "
        "a block: q/k/v/o, gate/up/down)",
    )

    measures_quality: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsities", _floats(self.sparsities, "sparsities"))
        super().__post_init__()
        check_sensitivity(self)


SCAN_UNUSED = ("sparsity", "target", "target_trials", "lazy", "save_format")  # prune-job settings a scan refuses


def _floats(value: Any, name: str) -> tuple[float, ...]:
    """A list of numbers from YAML, the CLI (strings, commas allowed) or Python; one line when one is not."""
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value or ())
    try:
        return tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise PrunekitError(f"{name} must be numbers (e.g. 0.5,0.7,0.9), got {value!r}") from None


def check_scan(config: PruneConfig, sparsities: tuple[float, ...]) -> None:
    """What a sensitivity scan cannot do, before any work: it sets each part's sparsity itself."""
    from .groups import check_sparsity

    if config.structured:
        raise PrunekitError(
            f"a sensitivity scan prunes one part at a time and restores it; structured method {config.method!r} "
            "changes the model's shapes: scan with an unstructured method (wanda, magnitude, sparsegpt, ...)"
        )
    if config.pattern is not None:
        raise PrunekitError("a sensitivity scan varies the sparsity; an N:M pattern fixes it: drop --pattern")
    if config.allocation != "uniform":
        raise PrunekitError(
            f"a sensitivity scan sets each part's sparsity itself; drop --allocation {config.allocation}"
        )
    if not sparsities:
        raise PrunekitError("a sensitivity scan needs at least one sparsity (--sparsities 0.5,0.7,0.9)")
    for s in sparsities:
        check_sparsity(s)


def check_sensitivity(recipe: SensitivityRecipe) -> None:
    if recipe.parts not in SCAN_PARTS:
        raise PrunekitError(f"unknown parts {recipe.parts!r}; choose from {', '.join(SCAN_PARTS)}")
    defaults = PruneRecipe.__dataclass_fields__
    given = [name for name in SCAN_UNUSED if getattr(recipe, name) != defaults[name].default]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise PrunekitError(f"a sensitivity scan does not use {flags}; drop it (the scan's sparsities: --sparsities)")
    check_scan(recipe, recipe.sparsities)
    if not recipe.eval_data and not recipe.calib_data:
        raise PrunekitError("a sensitivity scan needs data to measure on: --eval-data, or --calib-data to hold out of")


def field_names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def recipe_keys(cls) -> set[str]:
    """Keys a YAML recipe may hold (everything but command-line-only settings)."""
    return {f.name for f in fields(cls) if f.metadata.get("recipe", True)}


def recipe_from_dict(cls, data: dict[str, Any], source: str = "recipe", cli: dict[str, Any] | None = None):
    """Build ``cls`` from a recipe mapping plus command-line ``cli`` settings, rejecting unknown keys with the
    list of known ones, and command-line-only keys found in the file."""
    if not isinstance(data, dict):
        raise PrunekitError(f"{source} must be a YAML mapping of settings, got {type(data).__name__}")
    cli_only = sorted(set(data) & (field_names(cls) - recipe_keys(cls)))
    if cli_only:
        flags = ", ".join("--" + k.replace("_", "-") for k in cli_only)
        raise PrunekitError(
            f"{source} sets {cli_only}, which only the command line may enable; remove it from the "
            f"recipe and pass {flags} if you trust the checkpoint"
        )
    unknown = sorted(set(data) - field_names(cls))
    if unknown:
        raise PrunekitError(f"unknown key(s) {unknown} in {source}; known keys: {', '.join(sorted(recipe_keys(cls)))}")
    try:
        return cls(**{**data, **(cli or {})})
    except TypeError as err:  # a value of the wrong kind that the dataclass itself rejected
        raise PrunekitError(f"{source}: {err}") from None


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


def load_recipe(cls, path: str | os.PathLike | None, overrides: dict[str, Any]):
    """Recipe from YAML (if given) with command-line ``overrides`` (only settings the user gave) on top."""
    data = load_yaml(path) if path else {}
    cli = {k: v for k, v in overrides.items() if v is not None}
    return recipe_from_dict(cls, data, source=str(path) if path else "command line", cli=cli)


def recipe_dict(recipe) -> dict[str, Any]:
    """The recipe as plain YAML-able data, without command-line-only settings (it must load again)."""
    keys = recipe_keys(type(recipe))
    return {f.name: _plain(getattr(recipe, f.name)) for f in fields(recipe) if f.name in keys}


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def dump_recipe(recipe, path: str | os.PathLike) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(recipe_dict(recipe), sort_keys=False))
