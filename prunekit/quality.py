"""Jobs that measure quality while they prune: ``prunekit prune --target`` and ``prunekit sensitivity``.

Both score models with the model class's own evaluation (``prunekit.commands.evaluate``: perplexity, top-1,
accuracy, ...) on ``--eval-data``, or, without it, on ``--holdout`` samples of the calibration data that
calibration never uses: text windows that share no token with the calibration windows, or images outside the
calibration sample (one of each class at least), written to a temporary folder and read back like evaluation data.

The target search keeps what trials can share: the loaded dense model (each trial prunes a copy), the calibration
batches and the prepared evaluation data. A sequential prune at a new sparsity needs new statistics after its
first block (the earlier blocks are pruned differently), so those are collected again; the scan, which prunes one
part of an otherwise dense model per trial, collects them once.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from .api import PruneReport, prune_model
from .commands import _write_report_json, claimed, evaluate, load_job, resolved_recipe, run_prune, save_run, validate
from .errors import PrunekitError
from .io import write_json
from .io.hf import load_config
from .io.timm import is_vision_source
from .metrics import dense_value
from .model_classes import Job, ModelClass, Prepared, model_class_of
from .recipe import PruneRecipe, SensitivityRecipe, dump_recipe, recipe_dict, recipe_from_dict
from .sensitivity import Scan, markdown, plot, sensitivity
from .target import Search, Trial, parse_bound

log = logging.getLogger(__name__)

Evaluate = Callable[[nn.Module], dict[str, float]]


# ---------------------------------------------------------------- what quality is measured on


@contextmanager
def quality_metric(job: Job, prepared: Prepared) -> Iterator[Evaluate]:
    """``model -> metrics`` on ``--eval-data``, else on a held-out slice of ``--calib-data`` (in a temporary
    folder for the body's time), each with the metric of the job's model class."""
    recipe = job.recipe
    if recipe.eval_data:
        yield _quiet_after_first(lambda m: evaluate(m, job, prepared))
        return
    with tempfile.TemporaryDirectory(prefix="prunekit-holdout-") as scratch:
        held = dataclasses.replace(job, recipe=heldout_recipe(job, Path(scratch)))
        held_prepared = job.model_class.prepare(held)
        log.info("measuring quality on %d samples held out of %s", recipe.holdout, recipe.calib_data)
        yield _quiet_after_first(lambda m: evaluate(m, held, held_prepared))


LIGHTNING_INFO = "lightning.pytorch.utilities.rank_zero"  # "GPU available: ..." each time a Trainer is made


def _quiet_after_first(evaluate_model: Evaluate) -> Evaluate:
    """``evaluate_model`` whose repeats do not log Lightning's per-Trainer device lines again (image models make a
    Trainer per evaluation; a search or scan runs dozens)."""
    calls = []

    def run(model: nn.Module) -> dict[str, float]:
        if not calls:
            calls.append(True)
            return evaluate_model(model)
        logger = logging.getLogger(LIGHTNING_INFO)
        level = logger.level
        logger.setLevel(max(level, logging.WARNING))
        try:
            return evaluate_model(model)
        finally:
            logger.setLevel(level)

    return run


def measured_on(recipe: PruneRecipe) -> str:
    """Where quality was measured, in words (for reports and tables)."""
    if recipe.eval_data:
        return f"--eval-data {Path(recipe.eval_data).name}"
    return f"{recipe.holdout} samples held out of the calibration data ({Path(recipe.calib_data).name})"


def heldout_recipe(job: Job, scratch: Path) -> PruneRecipe:
    """The recipe with ``eval_data`` pointing at the held-out samples, written into ``scratch``."""
    check_holdout(job.model_class)
    recipe = job.recipe
    if job.model_class.holdout == "images":
        held = heldout_images(recipe, scratch / "images")
    else:
        held = heldout_text(job, scratch / "heldout.txt")
    return dataclasses.replace(recipe, eval_data=str(held), holdout=PruneRecipe.__dataclass_fields__["holdout"].default)


def check_holdout(row: ModelClass) -> None:
    """Classes whose data is not plain text or an ImageFolder (image-text pairs, audio) have no held-out slice."""
    if row.holdout is None:
        raise PrunekitError(
            f"{row.name} models are measured on --eval-data ({row.data}); no held-out slice is cut from --calib-data "
            "for them: give --eval-data"
        )


def heldout_text(job: Job, path: Path) -> Path:
    """``--holdout`` windows of the calibration text that no calibration window touches, decoded into ``path``."""
    from .data.text import heldout_windows, load_text, tokenize
    from .model_classes.text import text_seqlen

    recipe, tokenizer = job.recipe, job.preprocessor
    seqlen = text_seqlen(recipe.seqlen, job.config, tokenizer)
    tokens = tokenize(tokenizer, load_text(recipe.calib_data, what="--calib-data"))
    windows = heldout_windows(tokens, recipe.nsamples, seqlen, recipe.seed, recipe.holdout)
    texts = tokenizer.batch_decode(windows, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    path.write_text("\n".join(texts), encoding="utf-8")
    return path


def heldout_images(recipe: PruneRecipe, folder: Path) -> Path:
    """An ImageFolder of links to the calibration folder's images that calibration does not sample."""
    from .data.images import heldout_indices, image_dataset

    dataset = image_dataset(recipe.calib_data, skip_bad_images=recipe.skip_bad_images)
    for name in dataset.classes:
        (folder / name).mkdir(parents=True)
    for i in heldout_indices(dataset.targets, recipe.nsamples, recipe.seed, recipe.holdout):
        source, label = dataset.samples[i]
        link = folder / dataset.classes[label] / f"{i}-{Path(source).name}"
        try:
            link.symlink_to(Path(source).resolve())
        except OSError:  # no symlinks here (some Windows setups): copy
            shutil.copyfile(source, link)
    empty = [name for name in dataset.classes if not any((folder / name).iterdir())]
    if empty:
        raise PrunekitError(
            f"class folder(s) {empty[:5]} of --calib-data have no image outside the calibration sample to hold out; "
            "give --eval-data"
        )
    return folder


def dense_metrics(model: nn.Module, evaluate_model: Evaluate) -> dict[str, float]:
    """The dense model's metrics. Metrics against the dense model's own outputs (agreement, embedding cosine) make
    the first evaluation the reference and report nothing for it; a second one scores the dense model itself."""
    first = dict(evaluate_model(model))
    return first or dict(evaluate_model(model))


def check_class_metric(metric: str, dense: Mapping[str, float], what: str = "--target") -> None:
    """The bound's metric must be one this model's evaluation reports; else one line, before any pruning."""
    if metric not in dense:
        raise PrunekitError(
            f"{what} names {metric!r}, but this model's evaluation reports {', '.join(sorted(dense)) or 'nothing'}; "
            f"bound one of those"
        )


# ---------------------------------------------------------------- prune --target


def search_target(
    model: nn.Module,
    config: PruneRecipe | Any,
    calib: Any,
    evaluate_model: Evaluate,
    target: str,
    *,
    tokenizer: Any = None,
    max_trials: int = 8,
    dense: Mapping[str, float] | None = None,
    on_trial: Callable[[Trial, Search], None] | None = None,
) -> tuple[nn.Module | None, PruneReport | None, Search]:
    """The highest sparsity (structured methods: ratio) at which ``model`` pruned with ``config`` meets ``target``
    (``"ppl<=+10%"``) as ``evaluate_model`` measures it. ``model`` stays dense: each trial prunes a copy, and the
    best pruned copy and its report come back with the search (None, None when no trial met the bound; a bound the
    dense model misses raises before any trial). ``config.sparsity`` is the first trial."""
    from .config import PruneConfig

    config = PruneConfig.of(config).as_config()
    bound = parse_bound(target)
    dense = dict(dense) if dense is not None else dense_metrics(model, evaluate_model)
    check_class_metric(bound.metric, dense)
    search = Search(bound, dense_value(bound.metric, dense), first=config.sparsity, max_trials=max_trials)
    search.check_dense()
    best: tuple[nn.Module, PruneReport] | None = None
    while (sparsity := search.propose()) is not None:
        trial, pruned = _trial(model, config, calib, tokenizer, evaluate_model, search, sparsity)
        if trial.met and search.best is trial:
            best = pruned
        if on_trial is not None:
            on_trial(trial, search)
    return (*(best or (None, None)), search)


def _trial(model, config, calib, tokenizer, evaluate_model: Evaluate, search: Search, sparsity: float):
    start = time.perf_counter()
    pruned = copy.deepcopy(model)
    try:
        report = prune_model(pruned, dataclasses.replace(config, sparsity=sparsity), calib, tokenizer)
        metrics, error = dict(evaluate_model(pruned)), None
    except PrunekitError as err:  # e.g. a structured ratio the model cannot take: a miss, and the search goes lower
        report, metrics, error = None, {}, str(err)
    trial = search.record(sparsity, metrics, time.perf_counter() - start, error)
    log.info("target trial: sparsity %.4f -> %s (%s)", sparsity, metrics or error, "meets" if trial.met else "misses")
    return trial, (pruned, report)


def trial_line(trial: Trial, search: Search) -> str:
    """One printed line per trial: what was tried, what it measured, and whether it meets the bound."""
    number = search.trials.index(trial) + 1
    head = f"trial {number}/{search.max_trials}: sparsity {trial.sparsity:.4f}"
    if trial.error:
        return f"{head} -> could not prune: {trial.error}"
    value = trial.metrics.get(search.bound.metric)
    verdict = "meets" if trial.met else "misses"
    limit = search.bound.threshold(search.dense)
    return (
        f"{head} -> {search.bound.metric} {value:.4f} ({verdict} {search.bound.text}: "
        f"{search.bound.op} {limit:.4f}) [{trial.seconds:.1f}s]"
    )


def no_sparsity_line(search: Search) -> str:
    """The final line when no trial met the bound."""
    lowest = min(search.trials, key=lambda t: t.sparsity, default=None)
    tried = ""
    if lowest is not None:
        got = lowest.error or f"{search.bound.metric} {lowest.metrics.get(search.bound.metric, float('nan')):.4g}"
        tried = f" even the lowest sparsity tried, {lowest.sparsity:g}, gives {got};"
    return (
        f"no sparsity meets --target {search.bound.text!r} (limit {search.bound.threshold(search.dense):.4g}, dense "
        f"{search.dense:.4g}):{tried} nothing was saved; loosen the target"
    )


def prune_job(
    recipe: PruneRecipe,
    recipe_path: str | os.PathLike | None = None,
    on_trial: Callable[[Trial, Search], None] | None = None,
) -> PruneReport:
    """``prunekit prune`` with or without ``--target`` (``commands.run_prune`` prunes to one sparsity)."""
    if recipe.target is None:
        return run_prune(recipe, recipe_path)
    one_process("a --target search")
    return run_target(recipe, validate(recipe, recipe_path), on_trial)


def one_process(what: str) -> None:
    """Searches and scans run their trials in one process; under torchrun, one line instead of N copies."""
    from .distributed import launched_ranks

    if launched_ranks() > 1:
        raise PrunekitError(f"{what} runs in one process: start it without torchrun")


def run_target(
    recipe: PruneRecipe, inputs: dict[str, str | None], on_trial: Callable[[Trial, Search], None] | None = None
) -> PruneReport:
    """``prunekit prune --target``: search, then save the best model that meets the bound, the search in its
    report and the found sparsity in its recipe."""
    _check_heldout_class(recipe)
    with claimed(recipe, inputs) as claim:
        job, calib, prepared = load_job(recipe)
        model = job.model
        with quality_metric(job, prepared) as evaluate_model:
            dense = dense_metrics(model, evaluate_model)
            log.info("dense model: %s", dense)
            start = time.perf_counter()
            pruned, report, search = search_target(
                model,
                recipe,
                calib,
                evaluate_model,
                recipe.target,
                tokenizer=job.preprocessor,
                max_trials=recipe.target_trials,
                dense=dense,
                on_trial=on_trial,
            )
        if report is None:
            raise PrunekitError(no_sparsity_line(search))
        best = search.best
        report.metrics.update({**best.metrics, **{f"{k}_dense": v for k, v in dense.items()}})
        report.search = {**search.to_dict(), "measured_on": measured_on(recipe)}
        report.timings["search_s"] = time.perf_counter() - start
        resolved = found_recipe(recipe, best.sparsity, job.model_class, report)
        if claim is not None:
            save_run(pruned, job.preprocessor, report, resolved, claim)
    _write_report_json(recipe, report)
    return report


def found_recipe(recipe: PruneRecipe, sparsity: float, row: ModelClass, report: PruneReport) -> PruneRecipe:
    """The recipe that repeats the saved model without searching: the found sparsity, no target, and what the run
    resolved (as ``prunekit prune`` saves it: ``commands.resolved_recipe``)."""
    defaults = PruneRecipe.__dataclass_fields__
    resolved = {"sparsity": sparsity, "target": None}
    resolved.update({k: defaults[k].default for k in ("target_trials", "holdout")})
    return resolved_recipe(dataclasses.replace(recipe, **resolved), row, report)


def _check_heldout_class(recipe: PruneRecipe) -> None:
    """Classes without a held-out slice are refused from config.json, before the weights load."""
    if recipe.eval_data or is_vision_source(recipe.model):
        return
    check_holdout(model_class_of(recipe, load_config(recipe.model, recipe.trust_remote_code)))


# ---------------------------------------------------------------- sensitivity


def run_sensitivity(recipe: SensitivityRecipe, recipe_path: str | os.PathLike | None = None) -> Scan:
    """Scan, print nothing; with ``--out`` write sensitivity.json, sensitivity.md, the heat map sensitivity.png and
    the resolved recipe.yaml there (atomically), with ``--json`` the scan's JSON."""
    one_process("a sensitivity scan")
    inputs = validate(recipe, recipe_path)
    _check_heldout_class(recipe)
    with claimed(recipe, inputs) as claim:
        job, calib, prepared = load_job(recipe)
        model = job.model
        if job.model_class.transformers:
            recipe = dataclasses.replace(recipe, model_class=job.model_class.name)
            job.recipe = recipe
        with quality_metric(job, prepared) as evaluate_model:
            scan = sensitivity(
                model,
                recipe,
                calib,
                _reference_first(evaluate_model),
                sparsities=recipe.sparsities,
                granularity=recipe.parts,
                tokenizer=job.preprocessor,
            )
        scan.settings["recipe"] = recipe_dict(recipe)
        scan.settings["measured_on"] = measured_on(recipe)
        if claim is not None:
            with claim.staging() as tmp:
                write_scan(scan, tmp)
                dump_recipe(recipe, tmp / "recipe.yaml")
    if recipe.report_json:
        write_json(recipe.report_json, scan.to_dict())
    return scan


def _reference_first(evaluate_model: Evaluate) -> Evaluate:
    """``evaluate_model`` whose first call (the dense model) also scores it when it only set a reference."""
    calls = []

    def run(model: nn.Module) -> dict[str, float]:
        if not calls:
            calls.append(True)
            return dense_metrics(model, evaluate_model)
        return dict(evaluate_model(model))

    return run


def write_scan(scan: Scan, folder: Path) -> None:
    write_json(folder / "sensitivity.json", scan.to_dict())
    (folder / "sensitivity.md").write_text(markdown(scan), encoding="utf-8")
    plot(scan, folder / "sensitivity.png")


# ---------------------------------------------------------------- allocate: a scan -> an explicit recipe

SCAN_ONLY = ("sparsities", "parts", "out", "report_json", "overwrite", "holdout")  # not part of the prune recipe


def allocation_recipe(
    scan_data: Mapping, sparsity: float, metric: str | None = None, lam: float = 0.08
) -> tuple[dict, list[dict]]:
    """A prune recipe (plain data) whose explicit allocation spends ``sparsity`` as the scan predicts is least
    damaging: blocks by index, other parts layer by layer; and one row per part (name, params, sparsity)."""
    from .allocate import scan_allocation

    scan = Scan.from_dict(scan_data)
    per_part = scan_allocation(scan_data, [p.params for p in scan.parts], sparsity, metric, lam)
    sparsities: dict = {}
    for part, value in zip(scan.parts, per_part):
        keys = [part.block] if scan.granularity == "blocks" and part.block is not None else list(part.layers)
        sparsities.update({key: round(value, 4) for key in keys})
    defaults = {f.name: _default(f) for f in dataclasses.fields(PruneRecipe)}
    recipe = {
        k: v
        for k, v in (scan.settings.get("recipe") or {}).items()
        if k not in SCAN_ONLY and (k == "method" or k not in defaults or v != _plain_default(defaults[k]))
    }
    recipe.update(
        sparsity=sparsity,
        allocation="explicit",
        allocation_params={"sparsities": sparsities, "normalize": True},
    )
    rows = [{"part": p.name, "params": p.params, "sparsity": v} for p, v in zip(scan.parts, per_part)]
    return recipe, rows


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _plain_default(value: Any) -> Any:
    """A default as ``recipe_dict`` writes it (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


def write_allocation_recipe(
    scan_path: str, sparsity: float, out: str, metric: str | None = None, lam: float = 0.08, overwrite: bool = False
) -> list[dict]:
    """``prunekit allocate``: the explicit-allocation recipe from ``scan_path`` written to ``out`` (atomically,
    never over the scan); returns the per-part rows."""
    import yaml

    from .allocate import read_scan
    from .io.atomic import write_text
    from .io.paths import check_file_writable, check_paths

    check_paths({"--out": out}, {"--scan": scan_path})
    check_file_writable(out, "--out")
    if Path(out).exists() and not overwrite:
        raise PrunekitError(f"--out {out!r} exists; choose another file or pass --overwrite")
    from .allocate import Sensitivity

    Sensitivity(scan=scan_path, metric=metric, lam=lam)  # the same checks as --allocation sensitivity
    recipe, rows = allocation_recipe(read_scan(scan_path), sparsity, metric, lam)
    recipe_from_dict(PruneRecipe, dict(recipe), source=f"the recipe made from {scan_path}")  # it must load
    header = (
        f"# Made by `prunekit allocate --scan {scan_path} --sparsity {sparsity}`: per-block (or per-layer) sparsities\n"
        "# that spend the global sparsity where the sensitivity scan predicts the least damage. Edit them freely:\n"
        "# normalize: true rescales them to `sparsity` (their parameter-weighted mean). Run with\n"
        "#   prunekit prune --recipe THIS_FILE --out DIR\n"
    )
    write_text(out, header + yaml.safe_dump(recipe, sort_keys=False))
    return rows
