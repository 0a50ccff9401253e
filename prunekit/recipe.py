"""Recipes: the job around a ``PruneConfig`` (model, data, outputs), parsed from YAML and CLI flags in one place.

A recipe is a ``PruneConfig`` with the job's fields added, so its keys are the config's settings plus these,
one flat YAML mapping. Unknown keys are errors (a typo must not silently fall back to a default); the
resolved recipe is saved next to the outputs so a run can be repeated exactly. Remote code can be enabled
only on the command line (or in Python), never by a recipe file alone.

One loader (``prunekit.io.yamlfile.load_yaml``) serves prune, fine-tune and evaluation configs: ``yaml.safe_load``
only, with one-line errors for a missing file, malformed YAML, or a top level that is not a mapping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from .config import PruneConfig, check_save_format, lazy_problems, refuse_unused, setting
from .errors import PrunekitError
from .io.yamlfile import load_yaml
from .model_classes import AUTO, HF_CLASSES, check_choice

SCAN_PARTS = ("blocks", "kinds")  # what one sensitivity trial prunes (prunekit.sensitivity)
TARGET_UNUSED_WHY = "a --target search prunes copies in memory, trial by trial, in one process"


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
        + "; ".join(f"{name}: {row.what}" for name, row in HF_CLASSES.items()),
        example="causal-lm",
    )
    out: str | None = setting(
        None, "output directory (claimed at the start, written atomically; never an input)", example="out"
    )
    calib_data: str | None = setting(
        None,
        "calibration text file / dataset (text models), ImageFolder (image models), image-text folder with "
        "data.jsonl (vision-language models, dual encoders; these also take an ImageFolder) or audio folder "
        "(speech models)",
        example="calib.txt",
    )
    eval_data: str | None = setting(
        None,
        "held-out data, evaluated before and after: text (perplexity; classifiers: agreement), labeled .jsonl "
        "(classifier accuracy), ImageFolder (top-1/top-5; dual encoders: zero-shot accuracy), image-text folder "
        "(text perplexity; dual encoders: retrieval recall) or audio folder (decoder perplexity)",
        example="eval.txt",
    )
    prompt_template: str = setting(
        "a photo of a {}.",
        "dual encoders: the caption of an ImageFolder image, its class folder's name in place of {} (zero-shot "
        "prompts and calibration captions)",
        example="the digit {}",
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
    target: str | None = setting(
        None,
        "quality target: the highest sparsity (structured: ratio) whose model keeps it, e.g. 'ppl<=+10%' (relative "
        "to dense), 'ppl<=60', 'top1>=0.98'; measured on --eval-data (else on --holdout calibration samples); "
        "--sparsity is the first trial",
        example="ppl<=+10%",
        example_with={"calib_data": "calib.txt"},
    )
    target_trials: int = setting(
        8,
        "most prune + evaluate trials a --target search runs",
        type=int,
        example=4,
        example_with={"target": "ppl<=+10%", "calib_data": "calib.txt"},
    )
    holdout: int = setting(
        64,
        "calibration samples (text windows / images) held out, never calibrated on, to measure --target or a "
        "sensitivity scan when no --eval-data is given",
        type=int,
        example=16,
        example_with={"target": "ppl<=+10%", "calib_data": "calib.txt"},
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
    check_save_format(recipe.save_format)
    if recipe.prompt_template.count("{}") != 1 or any(c in recipe.prompt_template.replace("{}", "") for c in "{}"):
        raise PrunekitError(
            f"prompt_template {recipe.prompt_template!r} must hold {{}} once (where the class name goes) and no other "
            "braces, e.g. 'a photo of a {}.'"
        )
    if recipe.eval_seqlen is not None and recipe.eval_seqlen < 1:
        raise PrunekitError(f"eval_seqlen must be a positive integer, got {recipe.eval_seqlen!r}")
    _check_quality(recipe)
    if recipe.resume:
        _check_resume(recipe)
    if not recipe.dist_timeout > 0:
        raise PrunekitError(f"dist_timeout must be a positive number of seconds, got {recipe.dist_timeout!r}")
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
    used = [f.name for f in fields(recipe) if f.name not in ("resume", "dist_timeout")]
    refuse_unused(recipe, used, "a --target search", TARGET_UNUSED_WHY)


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
            ("no --target (search in memory, then prune the found sparsity with --lazy)", recipe.target is not None),
        )
        if bad
    ]
    problems = job + lazy_problems(recipe)
    if problems:
        raise PrunekitError(f"--lazy needs {'; '.join(problems)}")


@dataclass(frozen=True)
class SensitivityRecipe(PruneRecipe):
    """``prunekit sensitivity``: the prune settings of the scan's method, the scan's own, and the job."""

    sparsities: tuple = setting(
        (0.5, 0.7, 0.9), "sparsities each part is pruned to, alone (repeatable)", repeat=True, example=(0.3, 0.6)
    )
    parts: str = setting(
        "blocks",
        "what one trial prunes: blocks (decoder layers, ViT blocks, CNN stages), or kinds (each kind of layer within "
        "a block: q/k/v/o, gate/up/down)",
        example="kinds",
    )

    measures_quality: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsities", _floats(self.sparsities, "sparsities"))
        super().__post_init__()
        check_sensitivity(self)


# Prune-job settings a scan refuses: it sets each part's sparsity itself, keeps the model in memory in one process
# and saves no model.
SCAN_UNUSED = ("sparsity", "target", "target_trials", "lazy", "save_format", "resume", "dist_timeout")
SCAN_UNUSED_WHY = "it prunes each part at --sparsities in memory, in one process, and saves a table, not a model"


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
    used = [f.name for f in fields(recipe) if f.name not in SCAN_UNUSED]
    refuse_unused(recipe, used, "a sensitivity scan", SCAN_UNUSED_WHY)
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
