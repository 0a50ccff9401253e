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
from typing import Any

from .config import PruneConfig, check_save_format, lazy_problems, setting
from .errors import PrunekitError
from .model_classes import AUTO, MODEL_CLASSES, check_choice


@dataclass(frozen=True)
class PruneRecipe(PruneConfig):
    """Everything ``prunekit prune`` does. Field names are the CLI's long flags with underscores."""

    model: str | None = setting(
        None,
        "local checkpoint directory or hub id; timm:NAME, local-dir:PATH, torchvision:NAME for image models",
        example="model",
    )
    model_class: str = setting(
        AUTO,
        "how a Hugging Face checkpoint loads: auto (from architectures in its config.json) or "
        + "; ".join(f"{name}: {row.what}" for name, row in MODEL_CLASSES.items()),
        example="causal-lm",
    )
    out: str | None = setting(
        None, "output directory (claimed at the start, written atomically; never an input)", example="out"
    )
    calib_data: str | None = setting(
        None,
        "calibration text file / dataset (text models), ImageFolder (image models) or image-text folder with "
        "data.jsonl (vision-language models)",
        example="calib.txt",
    )
    eval_data: str | None = setting(
        None,
        "held-out data, evaluated before and after: text (perplexity; classifiers: agreement), labeled .jsonl "
        "(classifier accuracy), ImageFolder (top-1/top-5) or image-text folder",
        example="eval.txt",
    )
    eval_seqlen: int | None = setting(None, "tokens per evaluation window (default: seqlen)", type=int, example=16)
    eval_batch_size: int = setting(8, "evaluation batch size", type=int, example=2)
    num_workers: int = setting(0, "image loading workers (calibration and evaluation)", type=int, example=1)
    skip_bad_images: bool = setting(
        False,
        "skip unreadable images in the image folders (counted in the log) instead of failing on the first one",
        type=bool,
        example=True,
    )
    lazy: bool = setting(
        False,
        "HF checkpoints larger than memory: read, prune and write one block at a time",
        type=bool,
        example=True,
        example_with={"out": "out"},
    )
    save_format: str = setting(
        "dense",
        "dense (from_pretrained layout) or compact (kept values + bitmask / 2:4 "
        "packing; `prunekit convert --to dense` restores)",
        example="compact",
    )
    overwrite: bool = setting(False, "replace a non-empty --out (at the very end, atomically)", type=bool, example=True)
    report_json: str | None = setting(
        None, "also write the prune report to this JSON file", flag="--json", example="report.json"
    )
    resume: bool | None = setting(
        None,
        "block-by-block runs keep their progress beside --out after each block, and a rerun of an interrupted run "
        "continues from it (saying so; refused, naming the difference, when a setting or input changed); --resume: "
        "there must be such a run to continue; --no-resume: keep no progress and discard an interrupted run's",
        type=bool,
        example=False,
    )
    dist_timeout: float = setting(
        1800.0,
        "torchrun: seconds a rank waits for the others (at a block's end, for a broadcast) before it gives up",
        type=float,
        example=60.0,
    )
    trust_remote_code: bool = setting(
        False,
        "run the checkpoint's own Python code (command line only, never from a recipe)",
        type=bool,
        recipe=False,
        example=True,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_job(self)


def check_job(recipe: PruneRecipe) -> None:
    """The job's own checks (the prune settings were checked by ``PruneConfig``)."""
    if not recipe.model:
        raise PrunekitError("no model given: pass --model PATH_OR_HUB_ID (or model: in the recipe)")
    check_choice(recipe.model_class)
    check_save_format(recipe.save_format)
    if recipe.eval_seqlen is not None and recipe.eval_seqlen < 1:
        raise PrunekitError(f"eval_seqlen must be a positive integer, got {recipe.eval_seqlen!r}")
    if recipe.resume:
        _check_resume(recipe)
    if not recipe.dist_timeout > 0:
        raise PrunekitError(f"dist_timeout must be a positive number of seconds, got {recipe.dist_timeout!r}")
    if recipe.lazy:
        _check_lazy(recipe)


def _check_resume(recipe: PruneRecipe) -> None:
    """--resume continues a block-by-block run: one that keeps its progress beside --out."""
    problems = [
        what
        for what, bad in (
            ("--out (the progress is kept beside it)", not recipe.out),
            ("an unstructured method (structured methods run in one pass)", recipe.structured),
            ("sequential calibration (--no-sequential runs in one pass)", not recipe.sequential),
            ("a group other than global (one threshold over every layer needs one pass)", recipe.group == "global"),
        )
        if bad
    ]
    if problems:
        raise PrunekitError(f"--resume needs {'; '.join(problems)}")


def _check_lazy(recipe: PruneRecipe) -> None:
    job = [
        what
        for what, bad in (
            ("--out (lazy pruning writes the checkpoint block by block)", not recipe.out),
            ("no --eval-data (evaluate the output afterwards with `prunekit eval ppl`)", bool(recipe.eval_data)),
        )
        if bad
    ]
    problems = job + lazy_problems(recipe)
    if problems:
        raise PrunekitError(f"--lazy needs {'; '.join(problems)}")


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
