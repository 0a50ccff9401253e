"""Jobs behind the CLI and recipes: load, (evaluate), prune, (evaluate), save atomically."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from .api import PruneReport, prune
from .data.images import image_calibration
from .data.text import load_text, tokenize
from .eval.image import evaluate_image
from .eval.perplexity import perplexity
from .groups import check_sparsity, parse_pattern
from .io import atomic_dir, check_output_dir, load_causal_lm, load_tokenizer, save_causal_lm, write_json
from .io.compact import save_compact
from .io.timm import is_vision_source, load_vision_model, local_path, save_vision_model
from .methods import METHODS, STRUCTURED
from .recipe import PruneRecipe, dump_recipe

log = logging.getLogger(__name__)


def validate(recipe: PruneRecipe) -> Path | None:
    """Every check that needs no model: raise before any loading, work or writes."""
    check_sparsity(recipe.sparsity)
    parse_pattern(recipe.pattern)
    if recipe.method not in METHODS and recipe.method not in STRUCTURED:
        METHODS[recipe.method]  # raises with the list of methods
    for path in (recipe.calib_data, recipe.eval_data):
        if path and _looks_local(path) and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"data path {path!r} does not exist")
    if recipe.out is None:
        return None
    return check_output_dir(recipe.out, [local_path(recipe.model) or recipe.model], recipe.overwrite)


def _looks_local(path: str) -> bool:
    return str(path).startswith((".", "/", "~")) or Path(path).suffix != "" or os.sep in str(path)


def load_model(recipe: PruneRecipe) -> tuple[nn.Module, Any]:
    """A vision classifier (``timm:``, ``local-dir:``, ``torchvision:``, saved vision dir) or a HF causal LM
    with its tokenizer."""
    if is_vision_source(recipe.model):
        return load_vision_model(recipe.model), None
    model = load_causal_lm(recipe.model, recipe.dtype, recipe.trust_remote_code)
    return model, load_tokenizer(recipe.model, recipe.trust_remote_code)


def calibration(model: nn.Module, tokenizer: Any, recipe: PruneRecipe) -> Any:
    """Image models take a seeded sample of preprocessed images; LLMs take the text path as it is."""
    if recipe.calib_data and tokenizer is None:
        return image_calibration(model, recipe.calib_data, recipe.nsamples, recipe.batch_size, recipe.seed,
                                 recipe.num_workers)
    return recipe.calib_data


def prune_with_recipe(model: nn.Module, tokenizer: Any, recipe: PruneRecipe) -> PruneReport:
    """``prunekit.prune`` with every setting taken from the recipe (the CLI and fine-tuning share it)."""
    return prune(model, recipe.method, recipe.sparsity, recipe.pattern, recipe.group,
                 calibration(model, tokenizer, recipe), update=recipe.update, method_params=recipe.method_params,
                 update_params=recipe.update_params, allocation=recipe.allocation,
                 allocation_params=recipe.allocation_params, include=recipe.include, exclude=recipe.exclude,
                 layer_types=recipe.layer_types, sequential=recipe.sequential, device=recipe.device,
                 tokenizer=tokenizer, nsamples=recipe.nsamples, seqlen=recipe.seqlen, seed=recipe.seed,
                 batch_size=recipe.batch_size, recalibrate_bn=recipe.recalibrate_bn)


def evaluate(model: nn.Module, tokenizer: Any, recipe: PruneRecipe, cache: dict) -> dict[str, float]:
    """Perplexity (LLMs) or top-1/top-5 (image models) on ``recipe.eval_data``; ``{}`` when not asked."""
    if not recipe.eval_data:
        return {}
    if tokenizer is None:
        result = evaluate_image(model, recipe.eval_data, batch_size=recipe.eval_batch_size,
                                num_workers=recipe.num_workers, progress=False)
        return {k: result[k] for k in ("top1", "top5", "loss") if k in result}
    if "tokens" not in cache:
        cache["tokens"] = tokenize(tokenizer, load_text(recipe.eval_data))
    seqlen = recipe.eval_seqlen or recipe.seqlen
    return {"ppl": perplexity(model, cache["tokens"], seqlen, recipe.eval_batch_size, device=recipe.device)}


def run_prune(recipe: PruneRecipe) -> PruneReport:
    """Prune ``recipe.model`` and, when ``recipe.out`` is set, save model + report + resolved recipe."""
    out = validate(recipe)
    if recipe.lazy:
        return run_prune_lazy(recipe, out)
    model, tokenizer = load_model(recipe)
    cache: dict = {}
    dense = evaluate(model, tokenizer, recipe, cache)
    report = prune_with_recipe(model, tokenizer, recipe)
    report.metrics.update({f"{k}_dense": v for k, v in dense.items()})
    report.metrics.update(evaluate(model, tokenizer, recipe, cache))
    if out is not None:
        save_run(model, tokenizer, report, recipe, out)
    return report


def save_run(model: nn.Module, tokenizer: Any, report: PruneReport, recipe: PruneRecipe, out: Path) -> None:
    with atomic_dir(out) as tmp:
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
    log.info("saved pruned model to %s", out)


def run_prune_lazy(recipe: PruneRecipe, out: Path | None) -> PruneReport:
    """Checkpoints larger than memory: one block at a time from the safetensors files to the output shards."""
    from .io.lazy import prune_lazy
    if out is None:
        raise ValueError("--lazy writes the pruned checkpoint block by block: give --out")
    if recipe.allocation != "uniform" or recipe.eval_data:
        raise ValueError("--lazy supports uniform allocation and no --eval-data; evaluate the output afterwards "
                         "with `prunekit eval ppl`")
    report = prune_lazy(recipe.model, out, recipe.method, recipe.sparsity, recipe.pattern, recipe.group,
                        recipe.calib_data, update=recipe.update, method_params=recipe.method_params,
                        update_params=recipe.update_params, include=recipe.include, exclude=recipe.exclude,
                        layer_types=recipe.layer_types, device=recipe.device, dtype=recipe.dtype,
                        tokenizer=load_tokenizer(recipe.model, recipe.trust_remote_code), nsamples=recipe.nsamples,
                        seqlen=recipe.seqlen, seed=recipe.seed, batch_size=recipe.batch_size,
                        offload_activations=recipe.offload_activations, save_format=recipe.save_format,
                        overwrite=True, trust_remote_code=recipe.trust_remote_code)
    write_json(out / "prune_report.json", report.to_dict())
    dump_recipe(recipe, out / "recipe.yaml")
    return report


def run_eval_ppl(model: str, data: str, seqlen: int = 2048, batch_size: int = 8, device: str | None = None,
                 dtype: str = "auto", trust_remote_code: bool = False) -> dict[str, Any]:
    for path in (model, data):
        if _looks_local(path) and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"path {path!r} does not exist")
    lm = load_causal_lm(model, dtype, trust_remote_code)
    tokens = tokenize(load_tokenizer(model, trust_remote_code), load_text(data))
    if device is not None:
        lm.to(device)
    ppl = perplexity(lm, tokens, seqlen, batch_size, device)
    return {"model": str(model), "data": str(data), "seqlen": seqlen, "windows": tokens.numel() // seqlen,
            "ppl": ppl}
