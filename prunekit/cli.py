"""The ``prunekit`` command. Parsing and printing only; the work lives in ``prunekit.commands``.

The ``prune`` flags are derived from the fields of ``PruneRecipe`` (a ``PruneConfig`` plus the job): a new
setting is a new field, and its flag and recipe key follow. Nothing here imports torch at import time, so
``prunekit --help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import inspect
import logging
import os
import signal
import sys
import traceback
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import PrunekitError
from .recipe import PruneRecipe, load_recipe

# Operating-system errors that are the machine's state, not our bug: one line and what to do.
USER_OS_ERRORS = {
    errno.ENOSPC: "free some disk space or choose another --out",
    errno.EDQUOT: "free some of your disk quota or choose another --out",
    errno.EROFS: "the file system is read-only; choose another --out",
    errno.EACCES: "no permission; choose a path you can write",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
}
BUG_HINT = "this is a bug in prunekit, not in your input: please report it with the command line and the traceback"


# ---------------------------------------------------------------- flags from dataclass fields


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_setting_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of ``cls`` that carries CLI metadata (``prunekit.config.setting``), but those in ``skip``;
    unset flags stay ``None`` so a recipe's value (or the field's default) applies."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta or f.name in skip:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = default not in (None, (), {}, False) and not isinstance(default, bool)
        text = meta["help"] + (f" (default: {_shown(default)})" if shown else "")
        name = flag_name(f)
        if meta.get("keyvalue"):
            parser.add_argument(name, dest=f.name, action="append", metavar="KEY=VALUE", help=text)
        elif meta.get("repeat"):
            parser.add_argument(name, dest=f.name, action="append", help=text)
        elif meta.get("type") is bool:
            parser.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(name, dest=f.name, type=meta.get("type") or str, help=text)


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def setting_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The settings the user gave on the command line, as ``cls``'s field values."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is None or not f.metadata:
            continue
        if f.metadata.get("keyvalue"):
            value = key_values(value, flag_name(f))
        elif f.metadata.get("repeat"):
            value = tuple(part.strip() for item in value for part in item.split(",") if part.strip())
        out[f.name] = value
    return out


def key_values(items: list[str], flag: str) -> dict[str, Any]:
    """``["rho=0.1", "steps=20"]`` -> ``{"rho": 0.1, "steps": 20}`` (values parsed as YAML scalars)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PrunekitError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise PrunekitError(f"{flag} {item!r}: the value is not a YAML scalar; quote it") from None
    return out


# ---------------------------------------------------------------- prune


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="prune a model (flags or --recipe YAML; flags override the recipe)")
    p.add_argument("--recipe", help="YAML recipe (see recipes/); every flag below is also a recipe key")
    add_setting_flags(p, PruneRecipe)
    p.set_defaults(func=cmd_prune)


def cmd_prune(args) -> int:
    from .quality import prune_job

    recipe = load_recipe(PruneRecipe, args.recipe, setting_values(args, PruneRecipe))
    report = prune_job(recipe, args.recipe, on_trial=print_trial)  # one sparsity, or a --target search
    if launch_rank() == 0:  # under torchrun the other ranks print nothing
        print_prune_report(report.to_dict())
        if recipe.out:
            print(f"saved to {recipe.out}")
    return 0


def print_prune_report(report: dict[str, Any]) -> None:
    """Per-layer sparsity (unstructured) or what was removed (structured), then metrics and time."""
    from rich.console import Console

    console = Console()
    if report.get("structure"):
        console.print(structure_table(report))
    else:
        console.print(layer_table(report))
        console.print(coverage_line(report.get("coverage") or {}))
    if report.get("search"):
        console.print(search_line(report["search"]), soft_wrap=True)
    metrics = report.get("metrics") or {}
    if metrics:
        console.print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    console.print(f"prune time {report['timings']['total_s']:.2f}s")


def print_trial(trial, search) -> None:
    """A --target search's trial as it finishes."""
    from .quality import trial_line

    print(trial_line(trial, search), flush=True)


def search_line(search: dict[str, Any]) -> str:
    """What a --target search found, and what it cost."""
    return (
        f"target {search['target']} ({search['metric']} limit {search['threshold']:.4f}, dense {search['dense']:.4f}): "
        f"highest sparsity that meets it {search['chosen']:.4f}, after {len(search['trials'])} prune + evaluate trials"
    )


def coverage_line(coverage: dict[str, Any]) -> str:
    """The sparsity over all block weights next to the selected layers', and what was left dense."""
    if "block_sparsity" not in coverage:
        return coverage.get("note", "")
    return (  # a coverage warning was logged already (once, on stderr)
        f"all weights inside {', '.join(coverage['blocks'])}: {coverage['block_sparsity']:.4f} zero; "
        f"{len(coverage['left_dense'])} tensor(s) left dense ({coverage['left_dense_params']:,} parameters, "
        "listed in prune_report.json)"
    )


def layer_table(report: dict[str, Any]):
    from rich.table import Table

    settings = report["settings"]
    what = " ".join(str(v) for v in (settings["method"], settings.get("pattern")) if v)
    table = Table(title=f"{what} - overall sparsity {report['sparsity']:.4f}")
    for col in ("layer", "shape", "sparsity"):
        table.add_column(col)
    for name, row in report["layers"].items():
        table.add_row(name, "x".join(map(str, row["shape"])), f"{row['sparsity']:.4f}")
    return table


def structure_table(report: dict[str, Any]):
    """A structured run's summary: parameters before and after, and what the method removed."""
    from rich.table import Table

    summary = report["structure"]
    table = Table(
        title=f"{report['settings']['method']} - removed {summary['removed_fraction']:.1%} of the block "
        f"parameters, {summary['model_removed_fraction']:.1%} of the model"
    )
    table.add_column("what")
    table.add_column("value")
    for key, value in summary.items():
        shown = f"{value:.4f}" if isinstance(value, float) else (f"{value:,}" if isinstance(value, int) else value)
        table.add_row(key.replace("_", " "), str(shown))
    return table


# ---------------------------------------------------------------- sensitivity and allocate


def _add_sensitivity(sub) -> None:
    from .recipe import SCAN_UNUSED, SensitivityRecipe

    p = sub.add_parser(
        "sensitivity",
        help="prune each block (or each kind of layer in each block) alone at a few sparsities and measure the "
        "metric: a table, a heat map (--out) and JSON",
    )
    p.add_argument("--recipe", help="YAML recipe; every flag below is also a recipe key")
    add_setting_flags(p, SensitivityRecipe, skip=SCAN_UNUSED)
    p.set_defaults(func=cmd_sensitivity)


def cmd_sensitivity(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .quality import run_sensitivity
    from .recipe import SensitivityRecipe
    from .sensitivity import dense_value, table_rows

    recipe = load_recipe(SensitivityRecipe, args.recipe, setting_values(args, SensitivityRecipe))
    scan = run_sensitivity(recipe, args.recipe)
    header, rows = table_rows(scan)
    table = Table(title=f"{scan.metric} with one part pruned (dense {dense_value(scan.metric, scan.dense):.4f})")
    for column in header:
        table.add_column(column, justify="left" if column == "part" else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    print(f"measured on {scan.settings['measured_on']}; scan time {scan.timings['total_s']:.1f}s")
    if recipe.out:
        print(f"wrote {recipe.out}/sensitivity.json, sensitivity.md, sensitivity.png (heat map), recipe.yaml")
    return 0


def _add_allocate(sub) -> None:
    p = sub.add_parser(
        "allocate",
        help="per-layer sparsities for a global target from a sensitivity scan, written as an editable recipe "
        "(allocation: explicit)",
    )
    p.add_argument("--scan", required=True, help="the sensitivity.json of `prunekit sensitivity --out DIR`")
    p.add_argument("--sparsity", required=True, type=float, help="the global (parameter-weighted) sparsity")
    p.add_argument("--out", required=True, help="the recipe to write (YAML)")
    p.add_argument("--metric", help="the measured metric the damage is read from (default: perplexity, else loss)")
    p.add_argument(
        "--lam", type=float, default=0.08, help="largest change of a part's sparsity from --sparsity (default: 0.08)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_allocate)


def cmd_allocate(args) -> int:
    from .quality import write_allocation_recipe

    rows = write_allocation_recipe(args.scan, args.sparsity, args.out, args.metric, args.lam, args.overwrite)
    width = max(len(r["part"]) for r in rows)
    for row in rows:
        print(f"{row['part']:<{width}}  {row['params']:>10,}  sparsity {row['sparsity']:.4f}")
    print(f"wrote {args.out}: run it with `prunekit prune --recipe {args.out} --out DIR`")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model")
    esub = p.add_subparsers(dest="eval_kind", required=True)
    ppl = esub.add_parser("ppl", help="perplexity on held-out text: non-overlapping windows, exp(mean token NLL)")
    ppl.add_argument("--recipe", help="LightningCLI-style YAML (recipes/llama-ppl-eval.yaml): runs trainer.test")
    ppl.add_argument("--model")
    ppl.add_argument("--data", help="text file or dataset")
    ppl.add_argument("--seqlen", type=int, help="tokens per window (default: min(2048, the model's context))")
    ppl.add_argument("--batch-size", type=int)
    ppl.add_argument("--device")
    ppl.add_argument("--dtype", default="auto")
    ppl.add_argument("--trust-remote-code", action="store_true")
    ppl.add_argument("--tokenizer", help=TOKENIZER_HELP)
    ppl.add_argument("--json", help="write the result to this JSON file")
    ppl.set_defaults(func=cmd_eval_ppl)
    image = esub.add_parser("image", help="top-1/top-5 of an image classifier on an ImageFolder (Lightning)")
    image.add_argument("--recipe", help="LightningCLI-style YAML (recipes/imagenet-eval.yaml)")
    image.add_argument(
        "--model",
        help="timm:NAME, local-dir:PATH, torchvision:NAME, a saved prunekit directory or a Hugging Face image "
        "classifier (its own image processor prepares the images)",
    )
    image.add_argument("--data", help="ImageFolder in ImageNet layout (class folders)")
    image.add_argument("--batch-size", type=int)
    image.add_argument("--num-workers", type=int)
    image.add_argument("--accelerator")
    image.add_argument("--devices", type=int)
    image.add_argument("--num-classes", type=int, help="replace the classifier head (timm) before evaluating")
    image.add_argument("--json", help="write the results to this JSON file")
    image.set_defaults(func=cmd_eval_image)
    _add_zeroshot(esub)
    _add_eval_model(esub)


TOKENIZER_HELP = "tokenizer (or processor) directory or hub id, when the model directory has none"


def _add_eval_model(esub) -> None:
    """``prunekit eval model``: any model class, its own data and metric (``prunekit.model_classes``)."""
    from .model_classes import MODEL_CLASSES

    metrics = "; ".join(f"{name}: {row.metric}" for name, row in MODEL_CLASSES.items())
    p = esub.add_parser(
        "model",
        help="the metric of a saved model's class on its kind of data, as `prunekit prune --eval-data` reports it",
        description=f"Metrics by model class: {metrics}.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory or hub id (or timm:NAME, local-dir:PATH, ...)")
    p.add_argument("--data", required=True, help="evaluation data in the format of the model's class (see --help)")
    p.add_argument("--model-class", default="auto", help="as for prunekit prune (default: from config.json)")
    p.add_argument(
        "--reference", help="the dense model, for metrics that compare with it (embedding cosine, agreement)"
    )
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seqlen", type=int, help="tokens per text window (default: min(2048, the model's context))")
    p.add_argument(
        "--prompt-template", help="dual encoders: zero-shot prompt, {} = class name (default: 'a photo of a {}.')"
    )
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--json", help="write the result to this JSON file")
    p.set_defaults(func=cmd_eval_model)


def cmd_eval_model(args) -> int:
    from .commands import run_eval

    result = run_eval(eval_recipe(args), args.reference, args.tokenizer, args.json)
    print_metrics(result)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def eval_recipe(args) -> PruneRecipe:
    """The evaluation's settings as the recipe fields the model classes read."""
    given = {
        "model": args.model,
        "model_class": args.model_class,
        "eval_data": args.data,
        "eval_batch_size": args.batch_size,
        "eval_seqlen": args.seqlen,
        "prompt_template": args.prompt_template,
        "num_workers": args.num_workers,
        "device": args.device,
        "dtype": args.dtype,
        "trust_remote_code": args.trust_remote_code,
    }
    return PruneRecipe(**{k: v for k, v in given.items() if v is not None})


def print_metrics(result: dict[str, Any]) -> None:
    """``model_class metric=value ...`` on one line (values to 4 decimals)."""
    skip = {"model", "model_class", "data", "reference"}
    shown = "  ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items() if k not in skip
    )
    print(f"{result['model_class']}: {shown}")


def _sections(args, data_keys: dict[str, str], model_keys: dict[str, str]) -> dict[str, Any]:
    """Flags the user set, as overrides of a LightningCLI-style config's model:/data:/results: sections."""

    def pick(keys: dict[str, str]) -> dict[str, Any]:
        return {k: getattr(args, a) for k, a in keys.items() if getattr(args, a, None) is not None}

    out: dict[str, Any] = {"model": pick(model_keys), "data": pick(data_keys)}
    if args.json:
        out["results"] = args.json
    return {k: v for k, v in out.items() if v}


def _require(args, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        raise PrunekitError(f"{' and '.join(missing)} required (or --recipe)")


def cmd_eval_ppl(args) -> int:
    if args.recipe:
        from .eval.lightning_ppl import run_ppl_eval_config

        result = run_ppl_eval_config(
            args.recipe,
            _sections(args, {"path": "data", "seqlen": "seqlen", "batch_size": "batch_size"}, {"source": "model"}),
            trust_remote_code=args.trust_remote_code,
        )
    else:
        from .commands import run_eval_ppl

        _require(args, "model", "data")
        result = run_eval_ppl(
            args.model,
            args.data,
            args.seqlen,
            args.batch_size or 8,
            args.device,
            args.dtype,
            args.trust_remote_code,
            args.json,
            args.tokenizer,
        )
        result["results_file"] = args.json
    print(f"perplexity {result['ppl']:.4f}")
    _say_where(result)
    return 0


def _say_where(result: dict[str, Any]) -> None:
    if result.get("results_file"):
        print(f"wrote {result['results_file']}")


def cmd_eval_image(args) -> int:
    from .eval.image import evaluate_image, run_image_eval_config

    if args.recipe:
        result = run_image_eval_config(
            args.recipe,
            _sections(
                args,
                {"path": "data", "batch_size": "batch_size", "num_workers": "num_workers"},
                {"source": "model", "num_classes": "num_classes"},
            ),
        )
    else:
        from .io.timm import is_vision_source, load_vision_model

        _require(args, "model", "data")
        if not is_vision_source(args.model):  # a Hugging Face image classifier: its class's own evaluation
            return _eval_hf_image(args)
        model = load_vision_model(args.model, num_classes=args.num_classes)
        result = evaluate_image(
            model,
            args.data,
            batch_size=args.batch_size or 64,
            num_workers=args.num_workers or 0,
            accelerator=args.accelerator or "auto",
            devices=args.devices or 1,
            results=args.json,
        )
    top5 = f"  top-5 {result['top5']:.4f}" if "top5" in result else ""
    print(f"top-1 {result['top1']:.4f}{top5}  ({result['images']} images)")
    _say_where(result)
    return 0


def _eval_hf_image(args) -> int:
    from .commands import run_eval

    if args.num_classes is not None:
        raise PrunekitError("--num-classes replaces a timm model's head; a Hugging Face classifier keeps its own")
    recipe = PruneRecipe(
        model=args.model,
        model_class="image-classification",
        eval_data=args.data,
        eval_batch_size=args.batch_size or 64,
        num_workers=args.num_workers or 0,
    )
    result = run_eval(recipe, json_path=args.json)
    top5 = f"  top-5 {result['top5']:.4f}" if "top5" in result else ""
    print(f"top-1 {result['top1']:.4f}{top5}")
    _say_where({"results_file": args.json})
    return 0


def _add_zeroshot(esub) -> None:
    z = esub.add_parser("zeroshot", help="lm-eval-harness zero-shot accuracy with the model in memory")
    z.add_argument("--model", required=True)
    z.add_argument(
        "--tasks",
        required=True,
        help="comma list, e.g. boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa",
    )
    z.add_argument("--include-path", help="folder of local task YAMLs (offline tasks)")
    z.add_argument("--limit", type=float, help="documents per task (a fraction when < 1)")
    z.add_argument("--num-fewshot", type=int)
    z.add_argument("--batch-size", type=int, default=8)
    z.add_argument("--dtype", default="auto")
    z.add_argument("--json", help="write the results to this JSON file")
    z.set_defaults(func=cmd_eval_zeroshot)


def cmd_eval_zeroshot(args) -> int:
    from .eval.zeroshot import format_table, zeroshot
    from .io import load_causal_lm, load_tokenizer

    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    result = zeroshot(
        load_causal_lm(args.model, args.dtype),
        load_tokenizer(args.model),
        args.tasks,
        args.batch_size,
        limit,
        args.num_fewshot,
        args.include_path,
    )
    print(format_table(result))
    _maybe_json(args.json, result)
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="markdown table + plots from several runs' prune_report.json")
    p.add_argument("runs", nargs="+", help="run directories or JSON files")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="prunekit report")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from .report import build_report

    files = build_report(args.runs, args.out, args.title)
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0


def _add_finetune(sub) -> None:
    from .finetune.recipe import FinetuneRecipe

    p = sub.add_parser(
        "finetune", help="prune + fine-tune (LoRA or full, one-shot or gradual) from flags or a recipe (flags win)"
    )
    p.add_argument("--recipe", help="e.g. recipes/llama-wanda70-lora.yaml; every flag below is also a recipe key")
    add_setting_flags(p, FinetuneRecipe)
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    from .finetune.recipe import FinetuneRecipe
    from .finetune.run import run_finetune_recipe

    report = run_finetune_recipe(args.recipe, setting_values(args, FinetuneRecipe))
    print_finetune_report(report)
    if report["settings"].get("out"):
        print(f"saved to {report['settings']['out']}")
    return 0


def print_finetune_report(report: dict[str, Any]) -> None:
    """The metrics before and after as a small table (4 decimals), then sparsity and times."""
    from rich.console import Console

    console = Console()
    console.print(f"{report['task']} fine-tuning: sparsity {report['sparsity']:.4f}")
    console.print(finetune_table(report["metrics"]))
    timings = report.get("timings") or {}
    console.print("  ".join(f"{k.removesuffix('_s').replace('_', ' ')} time {v:.2f}s" for k, v in timings.items()))


def finetune_table(metrics: dict[str, float]):
    """``{"top1_dense": .., "top1_finetuned": .., "ppl_lora_unmerged": ..}`` as one row per stage (dense, pruned,
    lora unmerged, finetuned) and one column per metric, each value to 4 decimals."""
    from rich.table import Table

    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        metric, _, stage = key.partition("_")
        rows.setdefault(stage.replace("_", " "), {})[metric] = value
    columns = list(dict.fromkeys(metric for row in rows.values() for metric in row))
    table = Table()
    table.add_column("stage")
    for column in columns:
        table.add_column(column, justify="right")
    for stage, row in rows.items():
        table.add_row(
            stage, *(f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c, "–")) for c in columns)
        )
    return table


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between the dense HF layout and the compact format")
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--to", choices=["dense", "compact"], default="dense")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from .io.compact import convert

    weight_map = convert(args.source, args.out, args.to, overwrite=args.overwrite)
    print(f"wrote {len(weight_map)} tensors to {args.out} ({args.to})")
    return 0


def _maybe_json(path: str | None, data: dict) -> None:
    if path:
        from .io import write_json

        write_json(path, data)


def _add_methods(sub) -> None:
    p = sub.add_parser("methods", help="list registered methods, updates, groups, allocations")
    p.add_argument(
        "-v",
        "--verbose",
        dest="details",
        action="store_true",
        help="a table: kind, calibration, default group, parameters, description",
    )
    p.set_defaults(func=cmd_methods)


def registries() -> list[tuple[str, Any]]:
    from .allocate import ALLOCATORS
    from .groups import GROUPS
    from .methods import METHODS, UPDATES
    from .structured import STRUCTURED

    return [
        ("methods", METHODS),
        ("updates", UPDATES),
        ("structured", STRUCTURED),
        ("groups", GROUPS),
        ("allocations", ALLOCATORS),
    ]


def cmd_methods(args) -> int:
    if not args.details:
        for title, registry in registries():
            print(f"{title}: {', '.join(registry.names())}")
        return 0
    rows = [(name, title, *describe(registry[name])) for title, registry in registries() for name in registry.names()]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title="prunekit methods")
        for col in ("name", "kind", "calibration", "default group", "parameters (default)", "what"):
            table.add_column(col, overflow="fold")  # wrapped, never cut with an ellipsis
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return 0
    for name, kind, calibration, group, params, what in rows:  # a pipe: one plain block per entry, no width limit
        print(f"{name} ({kind.removesuffix('s')}): {what}")
        details = [("calibration", calibration), ("default group", group), ("parameters", params)]
        print("".join(f"  {label}: {value}\n" for label, value in details if value), end="")
    return 0


def describe(entry: Any) -> tuple[str, str, str, str]:
    """Calibration needed, default group, parameters with defaults, and the docstring's first sentence."""
    needs = getattr(entry, "needs", None)
    calib = getattr(entry, "needs_calibration", None)
    calibration = "yes" if needs or calib else ("no" if needs is not None or calib is not None else "")
    if needs:
        calibration += f" ({', '.join(sorted(needs))})"
    params = (
        ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(entry) if f.default is not dataclasses.MISSING)
        if dataclasses.is_dataclass(entry)
        else ""
    )
    return calibration, getattr(entry, "default_group", ""), params, first_sentence(entry)


def first_sentence(entry: Any) -> str:
    """The first sentence of ``entry``'s own docstring (not the signature dataclasses write when there is none)."""
    doc = inspect.getdoc(entry) or ""
    if doc.startswith(f"{getattr(entry, '__name__', '')}("):
        return ""
    paragraph = " ".join(doc.split("\n\n")[0].split()).replace("``", "")
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]


def demo_assets() -> Path:
    return Path(str(resources.files("prunekit") / "assets"))


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job on the built-in default: Wanda 50%% on a small LLaMA "
        "(kjv-llama-5m, shipped with prunekit), perplexity before/after",
    )
    p.add_argument("--out", default="out/demo-wanda-50")
    p.add_argument("--method", default="wanda")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from .commands import run_prune

    assets = demo_assets()
    recipe = PruneRecipe(
        model=str(assets / "kjv-llama-5m"),
        out=args.out,
        method=args.method,
        sparsity=args.sparsity,
        pattern=args.pattern,
        calib_data=str(assets / "kjv" / "train.txt"),
        nsamples=128,
        seqlen=256,
        eval_data=str(assets / "kjv" / "test.txt"),
        overwrite=True,
    )
    report = run_prune(recipe)
    print_prune_report(report.to_dict())
    print(f"saved to {args.out}")
    return 0


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("prunekit")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description="Prune vision and language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    parser.add_argument("--version", action="version", version=f"prunekit {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_prune,
        _add_sensitivity,
        _add_allocate,
        _add_eval,
        _add_methods,
        _add_demo,
        _add_report,
        _add_finetune,
        _add_convert,
    ):
        add(sub)
    return parser


# Lightning's loggers (made before Lightning is imported, so nothing here imports it) and the advert it logs
# at INFO when a Trainer has no LitLogger / LitModelCheckpoint.
LIGHTNING_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
ADVERT_PREFIX = "\N{ELECTRIC LIGHT BULB} Tip:"
# Deprecation notes one dependency raises about another's use of it (Lightning -> torch, peft -> transformers):
# nothing a prunekit user can act on.
DEPENDENCY_DEPRECATIONS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"`is_gradient_checkpointing` is deprecated",
)


class PrintedOnTheWay(logging.Filter):
    """Drops a record at the root handler when a handler on a logger below the root printed it already:
    Lightning adds its own console handler to the ``lightning`` logger when imported and lets its records
    propagate, so without this every Lightning ``INFO:`` line appeared twice."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None and logger is not logging.root:
            if logger.handlers:
                return False
            logger = logger.parent if logger.propagate else None
        return True


PRINTED_ON_THE_WAY = PrintedOnTheWay()  # one instance: calling main() again adds no second filter


def not_an_advert(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(ADVERT_PREFIX)


class OnceEach(logging.Filter):
    """Lightning logs which accelerators it found (``GPU available: ...``) for every Trainer, and a fine-tune
    builds several (evaluation before, training, evaluation after): each such line is printed once."""

    PREFIXES = ("GPU available", "TPU available", "HPU available", "IPU available")

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.PREFIXES):
            return True
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


ONCE_EACH = OnceEach()


def configure_logging(verbose: bool) -> None:
    """One handler on the root at WARNING (INFO with ``-v``); every line printed once; no adverts; no
    deprecation notes of one dependency about another that the user cannot act on. Under torchrun the ranks
    but rank 0 log errors only and show no progress bars: one rank speaks for all."""
    import warnings

    level = logging.INFO if verbose else logging.WARNING
    if launch_rank() > 0:
        level = logging.ERROR
        os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.root.handlers:
        handler.addFilter(PRINTED_ON_THE_WAY)
    logging.getLogger("prunekit.progress").setLevel(logging.INFO)  # plain progress lines where no bar is drawn
    for name in LIGHTNING_RANK_ZERO_LOGGERS:
        logging.getLogger(name).addFilter(not_an_advert)
        logging.getLogger(name).addFilter(ONCE_EACH)
    for message in DEPENDENCY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message)


def launch_rank() -> int:
    """This process's rank in a torchrun launch (0 without one), from the launcher's environment."""
    return int(os.environ.get("RANK", "0") or 0)


def _rank_prefix() -> str:
    return f"rank {launch_rank()}: " if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, torchrun stopping the ranks of a failed run), raised where the program
    is so that outputs in progress are removed and a resumable run keeps its progress, as on Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    distributed = sys.modules.get("prunekit.distributed")
    # After a failure every rank knows of the ranks are on their way out already: let the cleanup finish.
    if distributed is None or not distributed.stopping():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the cleanup itself is not interrupted again
        raise Terminated


def _lost_contact(err: BaseException) -> bool:
    """A collective failed because another rank stopped (its connection closed) or never answered (timeout)."""
    dist_error = getattr(sys.modules.get("torch.distributed"), "DistError", ())
    text = str(err)
    return (dist_error and isinstance(err, dist_error)) or any(k in text for k in ("gloo", "NCCL", "Connection"))


# Large CPU tensors on transparent huge pages: every new score, mask or weight copy of a 7B block otherwise faults
# its memory in 4 KiB at a time, which cost more than the work itself (docs/speed.md). torch reads this at its first
# CPU allocation, so the command sets it before anything imports torch (a value the user set wins); a Python program
# sets it itself, before importing torch. A process-wide effect: the entry point's, never an import's.
HUGE_PAGES = ("THP_MEM_ALLOC_ENABLE", "1")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault(*HUGE_PAGES)
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    pruning = args.command in ("prune", "demo")  # Lightning (finetune) handles its own signals
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if pruning and _main_thread() else None
    try:
        return _run_command(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _run_command(args) -> int:
    """The command, and what its failure looks like: one line (the user's to fix, or the machine's), a traceback
    only for our bugs. Under torchrun a failure every rank knows of is told once, by rank 0."""
    try:
        return args.func(args)
    except PrunekitError as err:  # the user's to fix: one line, no traceback
        if not (launch_rank() > 0 and getattr(err, "prunekit_agreed", False)):
            print(f"error: {'' if _peer(err) else _rank_prefix()}{err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # outputs in progress were removed by their context managers on the way out
        if launch_rank() == 0:
            print(f"{'terminated' if isinstance(err, Terminated) else 'interrupted'}: {_kept()}", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except OSError as err:
        if err.errno not in USER_OS_ERRORS:
            return _bug()
        where = f" writing {err.filename!r}" if err.filename else ""
        print(
            f"error: {_rank_prefix()}{err.strerror}{where}: {USER_OS_ERRORS[err.errno]} (no partial output was left)",
            file=sys.stderr,
        )
        return 2
    except Exception as err:
        if getattr(err, "prunekit_agreed", False) and launch_rank() > 0:
            return _bug(quiet=True)
        if _lost_contact(err):
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(
                f"error: {_rank_prefix()}lost contact with another rank (it stopped or was killed: its own output says "
                f"why; or it did not answer within --dist-timeout): {first}",
                file=sys.stderr,
            )
            return 2
        return _bug()


def _peer(err: BaseException) -> bool:
    from .distributed import PeerError

    return isinstance(err, PeerError)


def _kept() -> str:
    """What an interrupted run left: nothing in --out, and maybe its progress to resume from."""
    resume = sys.modules.get("prunekit.io.resume")
    kept = getattr(resume, "KEPT", None)
    if kept is not None and kept.exists():
        return f"--out was not written; the progress is kept in {str(kept)!r}: rerun the same command to resume"
    return "nothing was written"


def _bug(quiet: bool = False) -> int:
    """Ours to fix: keep the traceback, and say so (``quiet``: rank 0 reports another rank's, once)."""
    if not quiet:
        traceback.print_exc()
        print(f"error: {_rank_prefix()}{BUG_HINT}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
