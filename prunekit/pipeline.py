"""Jobs behind the CLI and recipes: load, (evaluate), prune, (evaluate), save atomically."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .api import PruneReport, prune
from .data.text import load_text, tokenize
from .eval.perplexity import perplexity
from .groups import check_sparsity, parse_pattern
from .io import atomic_dir, check_output_dir, load_causal_lm, load_tokenizer, save_causal_lm, write_json
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
    return check_output_dir(recipe.out, [recipe.model], recipe.overwrite)


def _looks_local(path: str) -> bool:
    return str(path).startswith((".", "/", "~")) or Path(path).suffix != "" or os.sep in str(path)


def eval_tokens(tokenizer, path: str | None) -> torch.Tensor | None:
    return tokenize(tokenizer, load_text(path)) if path else None


def run_prune(recipe: PruneRecipe) -> PruneReport:
    """Prune ``recipe.model`` and, when ``recipe.out`` is set, save model + report + resolved recipe."""
    out = validate(recipe)
    model = load_causal_lm(recipe.model, recipe.dtype, recipe.trust_remote_code)
    tokenizer = load_tokenizer(recipe.model, recipe.trust_remote_code)
    tokens = eval_tokens(tokenizer, recipe.eval_data)
    seqlen = recipe.eval_seqlen or recipe.seqlen
    metrics: dict[str, Any] = {}
    if tokens is not None:
        metrics["ppl_dense"] = perplexity(model, tokens, seqlen, device=recipe.device)
    report = prune(model, recipe.method, recipe.sparsity, recipe.pattern, recipe.group, recipe.calib_data,
                   update=recipe.update, method_params=recipe.method_params, update_params=recipe.update_params,
                   allocation=recipe.allocation, allocation_params=recipe.allocation_params,
                   include=recipe.include, exclude=recipe.exclude, layer_types=recipe.layer_types,
                   sequential=recipe.sequential, device=recipe.device, tokenizer=tokenizer,
                   nsamples=recipe.nsamples, seqlen=recipe.seqlen, seed=recipe.seed, batch_size=recipe.batch_size)
    if tokens is not None:
        metrics["ppl"] = perplexity(model, tokens, seqlen, device=recipe.device)
        metrics["eval_seqlen"] = seqlen
    report.metrics.update(metrics)
    if out is not None:
        save_run(model, tokenizer, report, recipe, out)
    return report


def save_run(model, tokenizer, report: PruneReport, recipe: PruneRecipe, out: Path) -> None:
    with atomic_dir(out) as tmp:
        save_causal_lm(model, tokenizer, tmp)
        write_json(tmp / "prune_report.json", report.to_dict())
        dump_recipe(recipe, tmp / "recipe.yaml")
    log.info("saved pruned model to %s", out)


def run_eval_ppl(model: str, data: str, seqlen: int = 2048, batch_size: int = 8, device: str | None = None,
                 dtype: str = "auto", trust_remote_code: bool = False) -> dict[str, Any]:
    for path in (model, data):
        if _looks_local(path) and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"path {path!r} does not exist")
    lm = load_causal_lm(model, dtype, trust_remote_code)
    tokens = eval_tokens(load_tokenizer(model, trust_remote_code), data)
    if device is not None:
        lm.to(device)
    ppl = perplexity(lm, tokens, seqlen, batch_size, device)
    return {"model": str(model), "data": str(data), "seqlen": seqlen, "windows": tokens.numel() // seqlen,
            "ppl": ppl}
