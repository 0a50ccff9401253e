"""What each CLI command does: check, load, (evaluate), prune, (evaluate), save atomically; evaluate a saved model.

Every check that needs no model runs in ``validate`` (and in the recipe's own ``__post_init__``) before
anything is loaded; the recipe *is* the ``PruneConfig`` that ``prunekit.prune`` and the lazy path take.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from .api import PruneReport, prune_model, resolve_seqlen
from .data.text import load_text, tokenize
from .distributed import is_writer, process_group, together
from .errors import PrunekitError
from .eval.perplexity import perplexity
from .io import load_causal_lm, load_tokenizer, write_json, write_model
from .io.atomic import OutputClaim, claim_on_writer
from .io.hf import SAVE_TOKENIZER, load_config, load_hf_model
from .io.paths import check_file_writable, check_paths, checkpoint_bytes, looks_local
from .io.resume import InMemoryResume, ResumeState, fingerprint
from .io.timm import is_vision_source, local_path
from .model_classes import (
    AUTO,
    MODEL_CLASSES,
    TEXT_CLASSES,
    TIMM,
    Job,
    ModelClass,
    Prepared,
    model_class_of,
    resolve_model_class,
)
from .recipe import PruneRecipe, dump_recipe

log = logging.getLogger(__name__)


def job_inputs(recipe: PruneRecipe, recipe_path: str | os.PathLike | None = None) -> dict[str, str | None]:
    """Every path the run reads, by flag: none of them may be written, and each local one must exist."""
    return {
        "--model": str(local_path(recipe.model) or recipe.model),
        "--calib-data": recipe.calib_data,
        "--eval-data": recipe.eval_data,
        "--recipe": str(recipe_path) if recipe_path else None,
    }


def check_inputs(inputs: dict[str, str | None]) -> None:
    """Every local-looking input must exist, all reported at once (hub names are checked when loaded)."""
    missing = [
        f"{flag} {path!r}"
        for flag, path in inputs.items()
        if path and looks_local(path) and not Path(path).expanduser().exists()
    ]
    if missing:
        raise PrunekitError(f"{', '.join(missing)} does not exist; check the path(s)")


def validate(recipe: PruneRecipe, recipe_path: str | os.PathLike | None = None) -> dict[str, str | None]:
    """Every check that needs no model, before any loading, work or writes; returns the inputs by flag.
    The outputs (``--out``, ``--json``) may not equal, contain or sit inside any input, nor each other."""
    inputs = job_inputs(recipe, recipe_path)
    check_inputs(inputs)
    if recipe.model_class != AUTO and is_vision_source(recipe.model):
        raise PrunekitError(
            f"--model-class chooses how a Hugging Face checkpoint loads, but {recipe.model!r} is a timm / "
            "torchvision image model; drop --model-class"
        )
    check_paths({"--out": recipe.out, "--json": recipe.report_json}, inputs)
    if recipe.report_json:
        check_file_writable(recipe.report_json, "--json")
    return inputs


@contextmanager
def claimed(recipe: PruneRecipe, inputs: dict[str, str | None]) -> Iterator[OutputClaim | None]:
    """``--out`` held exclusively from before loading to the final rename (nothing when there is no --out); with
    several ranks by rank 0, the only one that writes it."""
    if recipe.out is None:
        yield None
        return
    with claim_on_writer(recipe.out, inputs, recipe.overwrite, checkpoint_bytes(inputs["--model"])) as claim:
        yield claim


def run_fingerprint(recipe: PruneRecipe, inputs: dict[str, str | None]) -> dict:
    """What a resumed run must share with the interrupted one: every setting and every input but the recipe file
    (its settings are compared one by one)."""
    settings = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)}
    return fingerprint(settings, {flag: path for flag, path in inputs.items() if flag != "--recipe"})


def start_job(recipe: PruneRecipe, preprocessor_source: str | None = None) -> Job:
    """The run's model class, config.json and preprocessor (tokenizer, processor, image processor or feature
    extractor, from ``preprocessor_source`` when given), all before the weights; a class whose preprocessing lives
    in the model (timm) loads the model here."""
    if is_vision_source(recipe.model):
        job = Job(MODEL_CLASSES[TIMM], recipe)
    else:
        config = load_config(recipe.model, recipe.trust_remote_code)
        row = model_class_of(recipe, config)
        job = Job(row, recipe, config, row.preprocessor(preprocessor_source or recipe.model, recipe.trust_remote_code))
    if job.model_class.preprocessor is None:
        job.model = load_model(job)
    return job


def load_model(job: Job) -> nn.Module:
    """The model of ``job`` in eval mode: its class's own loader, or the transformers auto class."""
    row, recipe = job.model_class, job.recipe
    if row.load is not None:
        return row.load(job)
    return load_hf_model(recipe.model, row.auto_class, recipe.dtype, recipe.trust_remote_code)


def load_job(recipe: PruneRecipe, calibrate: bool = True) -> tuple[Job, Any, Prepared]:
    """The job with its model loaded, its calibration batches (when ``calibrate``) and its evaluation data. The
    class comes from config.json (or ``model_class``), and the data is read, checked and turned into model inputs
    before the weights load, so a data problem shows in seconds (see ``prunekit.model_classes``)."""
    job = start_job(recipe)
    row = job.model_class
    calib = row.calibration(job) if recipe.calib_data and calibrate else None
    prepared = row.prepare(job) if recipe.eval_data else Prepared(row.name)
    if job.model is None:
        job.model = load_model(job)
    return job, calib, prepared


def evaluate(model: nn.Module, job: Job, prepared: Prepared) -> dict[str, float]:
    """The metric of the model's class on ``recipe.eval_data`` (``{}`` when not asked, and for the dense model of a
    metric that compares with it)."""
    if not job.recipe.eval_data:
        return {}
    return job.model_class.score(model, prepared, job.recipe)


def prune_with_recipe(
    model: nn.Module, recipe: PruneRecipe, calib: Any = None, resume: InMemoryResume | None = None
) -> PruneReport:
    """``prunekit.prune`` with the recipe as its config (the CLI and fine-tuning share it)."""
    return prune_model(model, recipe, calib, None, resume)


def run_prune(recipe: PruneRecipe, recipe_path: str | os.PathLike | None = None) -> PruneReport:
    """Prune ``recipe.model`` and, when ``recipe.out`` is set, save model + report + resolved recipe. Under
    torchrun every rank runs this: the process group is set up here, rank 0 claims and writes the outputs and
    evaluates; a block-by-block run keeps its progress beside ``--out`` to resume from (``prunekit.io.resume``)."""
    if recipe.target is not None:
        raise PrunekitError("this job prunes to one sparsity; a --target search runs with prunekit.quality.prune_job")
    inputs = validate(recipe, recipe_path)
    with process_group(recipe.device, recipe.dist_timeout):
        if recipe.lazy:
            return run_prune_lazy(recipe, inputs)
        with claimed(recipe, inputs) as claim:
            state = ResumeState.open(recipe.out, recipe.resume, run_fingerprint(recipe, inputs))
            try:
                report, recipe = _prune_in_memory(recipe, claim, state)
            except BaseException as err:
                state.failed(err)
                raise
            state.finish()
        _write_report_json(recipe, report)
        return report


def _prune_in_memory(recipe: PruneRecipe, claim: OutputClaim | None, state: ResumeState):
    with together():
        job, calib, prepared = load_job(recipe)
        model, row = job.model, job.model_class
        dense = evaluate(model, job, prepared) if is_writer() else {}
    resume = InMemoryResume(state) if state.keep else None
    report = prune_with_recipe(model, recipe, calib, resume)
    with together():  # rank 0 evaluates and writes; the others wait to learn whether it succeeded
        if is_writer():
            report.metrics.update({f"{k}_dense": v for k, v in dense.items()})
            report.metrics.update(evaluate(model, job, prepared))
        recipe = resolved_recipe(recipe, row, report)
        if claim is not None:
            save_run(model, job.preprocessor, report, recipe, claim)
    return report, recipe


def resolved_recipe(recipe: PruneRecipe, row: ModelClass, report: PruneReport) -> PruneRecipe:
    """The recipe saved beside a pruned model, with what the run resolved: the Hugging Face model class (also in the
    report's settings) and, for text classes, the windows' length used (other classes' samples are as long as
    they are)."""
    if row.transformers:
        report.settings["model_class"] = row.name
        recipe = dataclasses.replace(recipe, model_class=row.name)
    if row.name in TEXT_CLASSES:
        recipe = dataclasses.replace(recipe, seqlen=report.settings.get("seqlen"))
    return recipe


def _write_report_json(recipe: PruneRecipe, report: PruneReport) -> None:
    if recipe.report_json and is_writer():
        write_json(recipe.report_json, report.to_dict())


def save_run(model: nn.Module, preprocessor: Any, report: PruneReport, recipe: PruneRecipe, claim: OutputClaim) -> None:
    """Model (with its tokenizer or processor), report and resolved recipe into the claimed ``--out``, all at once
    (one rename)."""
    with claim.staging() as tmp:
        write_model(model, tmp, preprocessor, recipe.save_format)
        write_json(tmp / "prune_report.json", report.to_dict())
        dump_recipe(recipe, tmp / "recipe.yaml")
    log.info("saved pruned model to %s", claim.out)


def run_prune_lazy(recipe: PruneRecipe, inputs: dict[str, str | None]) -> PruneReport:
    """Checkpoints larger than memory: one block at a time from the safetensors files to the output shards."""
    from .io.lazy import prune_lazy

    hf_config = load_config(recipe.model, recipe.trust_remote_code)
    model_class = resolve_model_class(hf_config, recipe.model_class, recipe.model)
    if model_class != "causal-lm":
        raise PrunekitError(
            f"--lazy prunes causal LMs block by block; {recipe.model!r} loads as {model_class}: prune it without --lazy"
        )
    tokenizer = load_tokenizer(recipe.model, recipe.trust_remote_code) if recipe.calib_data else None
    if recipe.calib_data:  # saved resolved: the windows' length used
        recipe = dataclasses.replace(recipe, model_class=model_class, seqlen=resolve_seqlen(recipe.seqlen, hf_config))
    report = prune_lazy(
        recipe.model,
        recipe.out,
        recipe,
        calib=recipe.calib_data,
        tokenizer=tokenizer,
        save_format=recipe.save_format,
        overwrite=recipe.overwrite,
        inputs=inputs,
        trust_remote_code=recipe.trust_remote_code,
        extra_files={"recipe.yaml": lambda path: dump_recipe(recipe, path)},
    )
    _write_report_json(recipe, report)
    return report


EVAL_TOKENIZER = f"pass --tokenizer PATH, or {SAVE_TOKENIZER}"


def run_eval_ppl(
    model: str,
    data: str,
    seqlen: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    json_path: str | None = None,
    tokenizer: str | None = None,
) -> dict[str, Any]:
    """Perplexity of a saved model (dense or compact prunekit output, or any HF causal LM) on a text file, tokenised
    with the model's own tokenizer or ``tokenizer`` (a directory or hub id); the text is read before the weights."""
    inputs = {"--model": model, "--data": data, "--tokenizer": tokenizer}
    check_inputs(inputs)
    if json_path:
        check_paths({"--json": json_path}, inputs)
        check_file_writable(json_path, "--json")
    if seqlen is not None and seqlen < 1:
        raise PrunekitError(f"--seqlen must be a positive integer, got {seqlen}")
    tokens = tokenize(load_tokenizer(tokenizer or model, trust_remote_code, EVAL_TOKENIZER), load_text(data))
    lm = load_causal_lm(model, dtype, trust_remote_code)
    seqlen = resolve_seqlen(seqlen, lm)
    ppl = perplexity(lm, tokens, seqlen, batch_size, device)
    if ppl != ppl or ppl == float("inf"):
        raise PrunekitError(
            f"perplexity is {ppl}: the model produced NaN/inf losses (damaged weights, or fp16 "
            "overflow: evaluate with --dtype float32)"
        )
    result = {"model": str(model), "data": str(data), "seqlen": seqlen, "windows": tokens.numel() // seqlen, "ppl": ppl}
    if json_path:
        write_json(json_path, result)
    return result


def run_eval(
    recipe: PruneRecipe, reference: str | None = None, tokenizer: str | None = None, json_path: str | None = None
) -> dict[str, Any]:
    """The metric of a saved model's class on ``recipe.eval_data`` (``prunekit eval model``): the data prepared
    before the weights load, as ``prunekit prune`` evaluates. A metric against the dense model (embedding cosine,
    agreement) needs that model as ``reference``; ``tokenizer`` names the tokenizer or processor when the model
    directory has none."""
    inputs = {**job_inputs(recipe), "--reference": reference, "--tokenizer": tokenizer}
    check_inputs(inputs)
    if json_path:
        check_paths({"--json": json_path}, inputs)
        check_file_writable(json_path, "--json")
    job = start_job(recipe, tokenizer)
    prepared = job.model_class.prepare(job)
    if reference is not None:
        dense = Job(job.model_class, dataclasses.replace(recipe, model=reference), job.config, job.preprocessor)
        evaluate(load_model(dense), job, prepared)  # the reference's outputs, kept in ``prepared``
    metrics = evaluate(job.model if job.model is not None else load_model(job), job, prepared)
    if not metrics:
        raise PrunekitError(
            f"the {job.model_class.name} metric on {recipe.eval_data!r} compares the model with the dense one "
            "(embedding cosine, agreement): pass the dense model as --reference PATH"
        )
    result = {"model": recipe.model, "model_class": job.model_class.name, "data": recipe.eval_data, **metrics}
    if reference is not None:
        result["reference"] = reference
    if json_path:
        write_json(json_path, result)
    return result
