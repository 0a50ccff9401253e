"""The ``prunekit`` command. Parsing and printing only; the work lives in ``prunekit.pipeline``."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .recipe import PruneRecipe, field_names, load_recipe

PATTERN_HELP = ("N:M sparsity, e.g. 2:4 = keep (at most) 2 non-zeros in every 4 consecutive weights along the "
                "input dimension (the hardware convention; the Wanda code's prune_n:prune_m counts pruned weights "
                "instead, the same at 2:4 and 4:8)")


def _key_values(items: list[str] | None, flag: str) -> dict[str, Any] | None:
    """``["rho=0.1", "steps=20"]`` -> ``{"rho": 0.1, "steps": 20}`` (values parsed as YAML scalars)."""
    if not items:
        return None
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: {flag} expects KEY=VALUE, got {item!r}")
        out[key.replace("-", "_")] = yaml.safe_load(value)
    return out


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="prune a model (flags or --recipe YAML; flags override the recipe)")
    p.add_argument("--recipe", help="YAML recipe (see recipes/)")
    p.add_argument("--model", help="HF causal-LM directory or hub id; image models: timm:NAME, local-dir:PATH, "
                                   "torchvision:NAME or a saved prunekit vision directory")
    p.add_argument("--out", help="output directory (written atomically; never the input)")
    p.add_argument("--method", help="wanda, magnitude, sparsegpt, ... (see `prunekit methods`)")
    p.add_argument("--method-param", action="append", metavar="KEY=VALUE", help="method hyper-parameter")
    p.add_argument("--update", action="append", help="weight update / mask refinement after the mask (admm, dsnot)")
    p.add_argument("--update-param", action="append", metavar="KEY=VALUE")
    p.add_argument("--sparsity", type=float, help="fraction of zeros in [0, 1) (default 0.5)")
    p.add_argument("--pattern", help=PATTERN_HELP)
    p.add_argument("--group", help="comparison group: per-output, per-input, per-layer, global (method default)")
    p.add_argument("--allocation", help="per-layer sparsity allocation: uniform (default), owl, ...")
    p.add_argument("--allocation-param", action="append", metavar="KEY=VALUE")
    p.add_argument("--include", action="append", help="fnmatch pattern of layer names to prune (repeatable)")
    p.add_argument("--exclude", action="append", help="fnmatch pattern of layer names to keep dense")
    p.add_argument("--layer-types", help="comma list: linear (incl. 1x1 conv), conv, all (default linear)")
    p.add_argument("--calib-data", help="calibration text file / dataset (LLMs) or ImageFolder (image models)")
    p.add_argument("--nsamples", type=int, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, help="tokens per calibration window (default 2048)")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int, help="calibration batch size (default 8)")
    p.add_argument("--no-sequential", dest="sequential", action="store_const", const=False,
                   help="one calibration pass over the dense model instead of block by block")
    p.add_argument("--device", help="compute device for the current block (cuda, cpu)")
    p.add_argument("--dtype", help="auto, float32, bfloat16, float16")
    p.add_argument("--eval-data", help="held-out text (perplexity) or ImageFolder (top-1/top-5), before and after")
    p.add_argument("--eval-seqlen", type=int)
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--num-workers", type=int, help="image loading workers (calibration and evaluation)")
    p.add_argument("--recalibrate-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="re-estimate BatchNorm statistics on the calibration images after pruning "
                        "(default: when a pruned layer feeds a BatchNorm)")
    p.add_argument("--overwrite", action="store_const", const=True, help="allow a non-empty --out")
    p.add_argument("--trust-remote-code", action="store_const", const=True)
    p.add_argument("--lazy", action="store_const", const=True,
                   help="HF checkpoints larger than memory: read, prune and write one block at a time")
    p.add_argument("--offload-activations", help="with --lazy: auto, device, cpu or disk")
    p.add_argument("--save-format", help="dense (from_pretrained layout, default) or compact (kept values + bitmask "
                                         "/ 2:4 packing; `prunekit convert --to dense` restores)")
    p.add_argument("--json", help="also write the prune report to this JSON file")
    p.set_defaults(func=cmd_prune)


def _prune_overrides(args) -> dict[str, Any]:
    overrides = {k: getattr(args, k) for k in field_names(PruneRecipe) if hasattr(args, k)}
    overrides["method_params"] = _key_values(args.method_param, "--method-param")
    overrides["update_params"] = _key_values(args.update_param, "--update-param")
    overrides["allocation_params"] = _key_values(args.allocation_param, "--allocation-param")
    if args.update:
        overrides["update"] = args.update[0] if len(args.update) == 1 else args.update
    if args.layer_types:
        overrides["layer_types"] = [t.strip() for t in args.layer_types.split(",")]
    return overrides


def cmd_prune(args) -> int:
    from .pipeline import run_prune
    recipe = load_recipe(PruneRecipe, args.recipe, _prune_overrides(args))
    report = run_prune(recipe)
    print_prune_report(report.to_dict())
    if args.json:
        from .io import write_json
        write_json(args.json, report.to_dict())
    if recipe.out:
        print(f"saved to {recipe.out}")
    return 0


def print_prune_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"{report['settings']['method']} - overall sparsity {report['sparsity']:.4f}")
    for col in ("layer", "shape", "sparsity"):
        table.add_column(col)
    for name, row in report["layers"].items():
        table.add_row(name, "x".join(map(str, row["shape"])), f"{row['sparsity']:.4f}")
    console = Console()
    console.print(table)
    metrics = report.get("metrics") or {}
    if metrics:
        console.print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    console.print(f"prune time {report['timings']['total_s']:.2f}s")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model")
    esub = p.add_subparsers(dest="eval_kind", required=True)
    ppl = esub.add_parser("ppl", help="perplexity on held-out text: non-overlapping windows, exp(mean token NLL)")
    ppl.add_argument("--recipe", help="LightningCLI-style YAML (recipes/llama-ppl-eval.yaml): runs trainer.test")
    ppl.add_argument("--model")
    ppl.add_argument("--data", help="text file or dataset")
    ppl.add_argument("--seqlen", type=int)
    ppl.add_argument("--batch-size", type=int)
    ppl.add_argument("--device")
    ppl.add_argument("--dtype", default="auto")
    ppl.add_argument("--trust-remote-code", action="store_true")
    ppl.add_argument("--json", help="write the result to this JSON file")
    ppl.set_defaults(func=cmd_eval_ppl)
    image = esub.add_parser("image", help="top-1/top-5 of an image classifier on an ImageFolder (Lightning)")
    image.add_argument("--recipe", help="LightningCLI-style YAML (recipes/imagenet-eval.yaml)")
    image.add_argument("--model", help="timm:NAME, local-dir:PATH, torchvision:NAME or a saved prunekit directory")
    image.add_argument("--data", help="ImageFolder in ImageNet layout (class folders)")
    image.add_argument("--batch-size", type=int)
    image.add_argument("--num-workers", type=int)
    image.add_argument("--accelerator")
    image.add_argument("--devices", type=int)
    image.add_argument("--num-classes", type=int, help="replace the classifier head (timm) before evaluating")
    image.add_argument("--json", help="write the results to this JSON file")
    image.set_defaults(func=cmd_eval_image)
    _add_zeroshot(esub)


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
        raise ValueError(f"{' and '.join(missing)} required (or --recipe)")


def cmd_eval_ppl(args) -> int:
    if args.recipe:
        from .eval.lightning_ppl import run_ppl_eval_config
        result = run_ppl_eval_config(args.recipe, _sections(
            args, {"path": "data", "seqlen": "seqlen", "batch_size": "batch_size"}, {"source": "model"}))
    else:
        from .pipeline import run_eval_ppl
        _require(args, "model", "data")
        result = run_eval_ppl(args.model, args.data, args.seqlen or 2048, args.batch_size or 8, args.device,
                              args.dtype, args.trust_remote_code)
        _maybe_json(args.json, result)
    print(f"perplexity {result['ppl']:.4f}")
    return 0


def cmd_eval_image(args) -> int:
    from .eval.image import evaluate_image, run_image_eval_config
    if args.recipe:
        result = run_image_eval_config(args.recipe, _sections(
            args, {"path": "data", "batch_size": "batch_size", "num_workers": "num_workers"},
            {"source": "model", "num_classes": "num_classes"}))
    else:
        from .io.timm import load_vision_model
        _require(args, "model", "data")
        model = load_vision_model(args.model, num_classes=args.num_classes)
        result = evaluate_image(model, args.data, batch_size=args.batch_size or 64, num_workers=args.num_workers or 0,
                                accelerator=args.accelerator or "auto", devices=args.devices or 1, results=args.json)
    top5 = f"  top-5 {result['top5']:.4f}" if "top5" in result else ""
    print(f"top-1 {result['top1']:.4f}{top5}  ({result['images']} images)")
    return 0


def _add_zeroshot(esub) -> None:
    z = esub.add_parser("zeroshot", help="lm-eval-harness zero-shot accuracy with the model in memory")
    z.add_argument("--model", required=True)
    z.add_argument("--tasks", required=True, help="comma list, e.g. boolq,rte,hellaswag,winogrande,arc_easy,"
                                                  "arc_challenge,openbookqa")
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
    result = zeroshot(load_causal_lm(args.model, args.dtype), load_tokenizer(args.model), args.tasks,
                      args.batch_size, limit, args.num_fewshot, args.include_path)
    print(format_table(result))
    _maybe_json(args.json, result)
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="markdown table + plots from several runs' prune_report.json; or, with "
                                      "--docs, the documentation pages from benchmark results")
    p.add_argument("runs", nargs="*", help="run directories or JSON files")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="prunekit report")
    p.add_argument("--docs", metavar="RESULTS_DIR", help="fill the templates in OUT/templates from RESULTS_DIR "
                                                         "(e.g. benchmarks/results) and write the pages to OUT")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from .errors import PrunekitError
    from .report import build_docs, build_report
    if bool(args.docs) == bool(args.runs):
        raise PrunekitError("prunekit report takes run directories / JSON files, or --docs RESULTS_DIR: exactly one")
    if args.docs:
        for page in build_docs(args.docs, args.out):
            print(f"page: {page}")
        return 0
    files = build_report(args.runs, args.out, args.title)
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="prune + fine-tune (LoRA or full, one-shot or gradual) from a recipe")
    p.add_argument("--recipe", required=True, help="e.g. recipes/llama-wanda70-lora.yaml, recipes/convnext-gradual.yaml")
    p.add_argument("--out")
    p.add_argument("--overwrite", action="store_const", const=True)
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    from .finetune.run import run_finetune_recipe
    overrides = {k: getattr(args, k) for k in ("out", "overwrite") if getattr(args, k) is not None}
    result = run_finetune_recipe(args.recipe, overrides)
    print(json.dumps(result.get("metrics", result), indent=2, default=str))
    return 0


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
    p = sub.add_parser("methods", help="list registered methods, updates, allocations")
    p.set_defaults(func=cmd_methods)


def cmd_methods(args) -> int:
    from .allocate import ALLOCATORS
    from .methods import METHODS, STRUCTURED, UPDATES
    for title, registry in (("methods", METHODS), ("updates", UPDATES), ("structured", STRUCTURED),
                            ("allocations", ALLOCATORS)):
        print(f"{title}: {', '.join(registry.names())}")
    return 0


def demo_assets() -> Path:
    return Path(str(resources.files("prunekit") / "assets"))


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the built-in default: Wanda 50%% on a small LLaMA "
                                    "(kjv-llama-5m, shipped with prunekit), perplexity before/after")
    p.add_argument("--out", default="out/demo-wanda-50")
    p.add_argument("--method", default="wanda")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from .pipeline import run_prune
    assets = demo_assets()
    recipe = PruneRecipe(model=str(assets / "kjv-llama-5m"), out=args.out, method=args.method,
                         sparsity=args.sparsity, pattern=args.pattern, calib_data=str(assets / "kjv" / "train.txt"),
                         nsamples=128, seqlen=256, eval_data=str(assets / "kjv" / "test.txt"), overwrite=True)
    report = run_prune(recipe)
    print_prune_report(report.to_dict())
    print(f"saved to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description="Prune vision and language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_prune, _add_eval, _add_methods, _add_demo, _add_report, _add_finetune, _add_convert):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
