"""Jobs behind the CLI and recipes: check, load, (evaluate), prune, (evaluate), save atomically.

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

from .api import PruneReport, prune, resolve_seqlen
from .data.images import image_calibration
from .data.text import load_text, tokenize
from .errors import PrunekitError
from .eval.perplexity import perplexity
from .io import load_causal_lm, load_tokenizer, save_causal_lm, write_json
from .io.atomic import OutputClaim, claim_output
from .io.compact import save_compact
from .io.hf import load_config, load_hf_model
from .io.paths import check_file_writable, check_paths, checkpoint_bytes, looks_local
from .io.timm import is_vision_source, load_vision_model, local_path, save_vision_model
from .jobs import Prepared, calibration_data, evaluate_prepared, evaluation_data, load_preprocessor
from .model_classes import AUTO, resolve_model_class
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
    """``--out`` held exclusively from before loading to the final rename (nothing when there is no --out)."""
    if recipe.out is None:
        yield None
        return
    with claim_output(recipe.out, inputs, recipe.overwrite, checkpoint_bytes(inputs["--model"])) as claim:
        yield claim


def load_job(recipe: PruneRecipe, calibrate: bool = True) -> tuple[nn.Module, Any, Any, Prepared]:
    """Model, tokenizer (or processor), calibration (when ``calibrate``) and evaluation data. For Hugging Face
    models the class comes from config.json (or ``model_class``), and the data is read, checked and turned into
    model inputs before the weights load, so a data problem shows in seconds."""
    if is_vision_source(recipe.model):
        model = load_vision_model(recipe.model)
        return model, None, calibration(model, None, recipe) if calibrate else None, Prepared(None)
    hf_config = load_config(recipe.model, recipe.trust_remote_code)
    model_class = resolve_model_class(hf_config, recipe.model_class, recipe.model)
    preprocessor = load_preprocessor(recipe, model_class)
    calib = calibration_data(model_class, preprocessor, hf_config, recipe) if recipe.calib_data and calibrate else None
    prepared = Prepared(model_class)
    if recipe.eval_data:
        prepared = evaluation_data(model_class, preprocessor, hf_config, recipe)
    model = load_hf_model(recipe.model, model_class, recipe.dtype, recipe.trust_remote_code)
    return model, preprocessor, calib, prepared


def calibration(model: nn.Module, tokenizer: Any, recipe: PruneRecipe) -> Any:
    """Image models take a seeded sample of preprocessed images; LLMs take the text path as it is."""
    if recipe.calib_data and tokenizer is None:
        return image_calibration(
            model,
            recipe.calib_data,
            recipe.nsamples,
            recipe.batch_size,
            recipe.seed,
            recipe.num_workers,
            skip_bad_images=recipe.skip_bad_images,
        )
    return recipe.calib_data


def prune_with_recipe(model: nn.Module, tokenizer: Any, recipe: PruneRecipe, calib: Any = None) -> PruneReport:
    """``prunekit.prune`` with the recipe as its config (the CLI and fine-tuning share it)."""
    calib = calib if calib is not None else calibration(model, tokenizer, recipe)
    return prune(model, recipe, calib=calib, tokenizer=tokenizer)


def evaluate(model: nn.Module, tokenizer: Any, recipe: PruneRecipe, prepared: Prepared) -> dict[str, float]:
    """The metric of the model's class on ``recipe.eval_data`` (perplexity for LLMs, top-1/top-5 for image
    models; see ``prunekit.jobs``); ``{}`` when not asked."""
    if not recipe.eval_data:
        return {}
    if tokenizer is None:
        from .eval.image import evaluate_image  # Lightning: imported only for image models

        result = evaluate_image(
            model,
            recipe.eval_data,
            batch_size=recipe.eval_batch_size,
            num_workers=recipe.num_workers,
            progress=False,
            skip_bad_images=recipe.skip_bad_images,
        )
        return {k: result[k] for k in ("top1", "top5", "loss") if k in result}
    return evaluate_prepared(model, prepared, recipe)


def run_prune(recipe: PruneRecipe, recipe_path: str | os.PathLike | None = None) -> PruneReport:
    """Prune ``recipe.model`` and, when ``recipe.out`` is set, save model + report + resolved recipe."""
    if recipe.target is not None:
        raise PrunekitError("this job prunes to one sparsity; a --target search runs with prunekit.quality.prune_job")
    inputs = validate(recipe, recipe_path)
    if recipe.lazy:
        return run_prune_lazy(recipe, inputs)
    with claimed(recipe, inputs) as claim:
        model, tokenizer, calib, prepared = load_job(recipe)
        dense = evaluate(model, tokenizer, recipe, prepared)
        report = prune_with_recipe(model, tokenizer, recipe, calib)
        report.metrics.update({f"{k}_dense": v for k, v in dense.items()})
        report.metrics.update(evaluate(model, tokenizer, recipe, prepared))
        if prepared.model_class is not None:
            report.settings["model_class"] = prepared.model_class
            recipe = dataclasses.replace(recipe, model_class=prepared.model_class)  # saved resolved
        if claim is not None:
            save_run(model, tokenizer, report, recipe, claim)
    _write_report_json(recipe, report)
    return report


def _write_report_json(recipe: PruneRecipe, report: PruneReport) -> None:
    if recipe.report_json:
        write_json(recipe.report_json, report.to_dict())


def save_run(model: nn.Module, tokenizer: Any, report: PruneReport, recipe: PruneRecipe, claim: OutputClaim) -> None:
    """Model, report and resolved recipe into the claimed ``--out``, all at once (one rename)."""
    with claim.staging() as tmp:
        if tokenizer is None:
            save_vision_model(model, tmp)
        elif recipe.save_format == "compact":
            model.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            save_compact(model, tmp)
        else:
            save_causal_lm(model, tokenizer, tmp)
        write_json(tmp / "prune_report.json", report.to_dict())
        dump_recipe(recipe, tmp / "recipe.yaml")
    log.info("saved pruned model to %s", claim.out)


def run_prune_lazy(recipe: PruneRecipe, inputs: dict[str, str | None]) -> PruneReport:
    """Checkpoints larger than memory: one block at a time from the safetensors files to the output shards."""
    from .io.lazy import prune_lazy

    model_class = resolve_model_class(
        load_config(recipe.model, recipe.trust_remote_code), recipe.model_class, recipe.model
    )
    if model_class != "causal-lm":
        raise PrunekitError(
            f"--lazy prunes causal LMs block by block; {recipe.model!r} loads as {model_class}: prune it without --lazy"
        )
    tokenizer = load_tokenizer(recipe.model, recipe.trust_remote_code) if recipe.calib_data else None
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


def run_eval_ppl(
    model: str,
    data: str,
    seqlen: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    json_path: str | None = None,
) -> dict[str, Any]:
    """Perplexity of a saved model (dense or compact prunekit output, or any HF causal LM) on a text file."""
    check_inputs({"--model": model, "--data": data})
    if json_path:
        check_paths({"--json": json_path}, {"--model": model, "--data": data})
        check_file_writable(json_path, "--json")
    if seqlen is not None and seqlen < 1:
        raise PrunekitError(f"--seqlen must be a positive integer, got {seqlen}")
    lm = load_causal_lm(model, dtype, trust_remote_code)
    seqlen = resolve_seqlen(seqlen, lm)
    tokens = tokenize(load_tokenizer(model, trust_remote_code), load_text(data))
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
