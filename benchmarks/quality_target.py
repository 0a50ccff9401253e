"""Quality targets and sensitivity allocation on the fixtures (issue 26), through the jobs users run.

* ``target``: ``prunekit prune --target`` (Wanda) on kjv-llama-5m for ``ppl<=+10%`` and ``ppl<=60``, and on
  convnext-digits for ``top1>=0.98``, next to a grid of prune + evaluate at 0.01 steps on the same protocol: the
  sparsity each search found, its trial count, and the grid's highest sparsity that meets the bound. kjv's grid is
  0.01 steps over [GRID_LOW, GRID_HIGH] plus 0.1 steps outside it (enough to show the curve crosses the bounds once,
  inside the fine window); convnext's grid is 0.01 steps over [0.01, 0.99].
* ``allocation``: kjv-llama-5m at 70% with Wanda: uniform, OWL, and the allocation from a sensitivity scan (every
  block x 0.5/0.7/0.9, measured on 64 windows held out of kjv/train.txt), written by ``prunekit allocate`` as an
  explicit recipe and pruned from it; the scan's heat map goes to results/quality_target_scan.png.

Protocol (../shared/fixtures/METRICS.md): calibration 128 windows x 256 tokens of kjv/train.txt (seed 0), perplexity
on kjv/test.txt in non-overlapping 256-token windows; digits: 128 calibration images of digits/train (seed 0), top-1 on
digits/val (450 images). Quality numbers only (no timing ratio: see sensitivity_speed.py). Run from the repository
root:

    python benchmarks/quality_target.py [--sections target allocation] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

import prunekit
from prunekit.data import load_text, random_windows, tokenize
from prunekit.eval import perplexity
from prunekit.io import write_json
from prunekit.quality import allocation_recipe, run_sensitivity
from prunekit.quality import prune_job as run_prune
from prunekit.recipe import PruneRecipe, SensitivityRecipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
KJV = FIXTURES / "kjv-llama-5m"
DIGITS = FIXTURES / "digits"
CONVNEXT = f"local-dir:{FIXTURES / 'convnext-digits'}"
GRID_LOW, GRID_HIGH = 0.50, 0.75
KJV_JOB = dict(
    model=str(KJV),
    method="wanda",
    calib_data=str(FIXTURES / "kjv" / "train.txt"),
    nsamples=128,
    seqlen=256,
    seed=0,
    eval_data=str(FIXTURES / "kjv" / "test.txt"),
)
DIGITS_JOB = dict(
    model=CONVNEXT,
    method="wanda",
    calib_data=str(DIGITS / "train"),
    nsamples=128,
    batch_size=32,
    seed=0,
    eval_data=str(DIGITS / "val"),
    eval_batch_size=150,
)


# ---------------------------------------------------------------- grids: prune + evaluate at fixed sparsities


def kjv_grid(sparsities: list[float]) -> dict[float, float]:
    """Test perplexity of Wanda (per-output) at each sparsity, as ``prunekit prune`` computes it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(KJV)
    base = AutoModelForCausalLM.from_pretrained(KJV).eval()
    calib = random_windows(tokenize(tokenizer, load_text(KJV_JOB["calib_data"])), 128, 256, seed=0)
    test = tokenize(tokenizer, load_text(KJV_JOB["eval_data"]))
    grid = {0.0: perplexity(base, test, 256)}
    for s in sparsities:
        model = copy.deepcopy(base)
        prunekit.prune(model, "wanda", s, calib=calib)
        grid[s] = perplexity(model, test, 256)
        print(f"kjv grid {s:.2f}: ppl {grid[s]:.3f}", flush=True)
    return grid


def digits_grid(sparsities: list[float]) -> dict[float, float]:
    """Validation top-1 of convnext-digits pruned with Wanda (the vision default: per-layer) at each sparsity."""
    from prunekit.data.images import image_calibration
    from prunekit.eval.image import evaluate_image
    from prunekit.io.timm import load_vision_model

    base = load_vision_model(CONVNEXT)
    calib = image_calibration(base, DIGITS_JOB["calib_data"], 128, 32, 0)

    def top1(model) -> float:
        return evaluate_image(model, DIGITS_JOB["eval_data"], batch_size=150, progress=False)["top1"]

    grid = {0.0: top1(base)}
    for s in sparsities:
        model = copy.deepcopy(base)
        prunekit.prune(model, "wanda", s, calib=calib)
        grid[s] = top1(model)
        print(f"digits grid {s:.2f}: top-1 {grid[s]:.4f}", flush=True)
    return grid


def highest_met(grid: dict[float, float], bound: str) -> float | None:
    from prunekit.target import parse_bound

    parsed = parse_bound(bound)
    return max((s for s, v in grid.items() if s > 0 and parsed.met(v, grid[0.0])), default=None)


def search(job: dict, bound: str, out: Path) -> dict:
    """``prunekit prune --target`` as a job: its report's search, and the wall time it took."""
    recipe = PruneRecipe(**job, target=bound, out=str(out), overwrite=True)
    start = time.perf_counter()
    report = run_prune(recipe, on_trial=lambda trial, s: print(f"  {bound}: {trial.sparsity:.2f} -> {trial.metrics}"))
    return {**report.search, "wall_s": time.perf_counter() - start}


def target_section(out: Path, scratch: Path) -> dict:
    fine = [round(GRID_LOW + i / 100, 2) for i in range(round((GRID_HIGH - GRID_LOW) * 100) + 1)]
    coarse = [s / 10 for s in range(1, 10) if not GRID_LOW <= s / 10 <= GRID_HIGH]
    kjv = kjv_grid(sorted(coarse + fine))
    digits = digits_grid([s / 100 for s in range(1, 100)])
    rows = []
    for name, grid, job, bound in (
        ("kjv-llama-5m", kjv, KJV_JOB, "ppl<=+10%"),
        ("kjv-llama-5m", kjv, KJV_JOB, "ppl<=60"),
        ("convnext-digits", digits, DIGITS_JOB, "top1>=0.98"),
    ):
        found = search(job, bound, scratch / "target")
        truth = highest_met(grid, bound)
        rows.append(
            {
                "model": name,
                "target": bound,
                "found": found["chosen"],
                "trials": len(found["trials"]),
                "grid_max": truth,
                "error": round(abs(found["chosen"] - truth), 4),
                "search": found,
            }
        )
        print(f"{name} {bound}: found {found['chosen']} in {len(found['trials'])} trials; grid {truth}", flush=True)
    return {"rows": rows, "kjv_grid": kjv, "digits_grid": digits, "fine_window": [GRID_LOW, GRID_HIGH]}


# ---------------------------------------------------------------- allocation at 70%


def allocation_section(out: Path, scratch: Path, sparsity: float = 0.7) -> dict:
    scan_recipe = SensitivityRecipe(**{**KJV_JOB, "eval_data": None}, out=str(scratch / "scan"), overwrite=True)
    scan = run_sensitivity(scan_recipe)
    (out / "quality_target_scan.png").write_bytes((scratch / "scan" / "sensitivity.png").read_bytes())
    rows = {}
    variants = {
        "uniform": {},
        "owl": {"allocation": "owl"},
        **{f"scan lam={lam}": {"lam": lam} for lam in (0.08, 0.05, 0.1, 0.99)},
    }
    for label, variant in variants.items():
        if "lam" in variant:
            data, parts = allocation_recipe(scan.to_dict(), sparsity, lam=variant["lam"])
            recipe = recipe_from_dict(PruneRecipe, {**data, "eval_data": KJV_JOB["eval_data"]})
        else:
            recipe = PruneRecipe(**KJV_JOB, sparsity=sparsity, **variant)
            parts = None
        report = run_prune(dataclasses.replace(recipe, out=None))
        targets = sorted({(name.split(".")[2], round(row["target"], 4)) for name, row in report.layers.items()})
        rows[label] = {
            "ppl": report.metrics["ppl"],
            "ppl_dense": report.metrics["ppl_dense"],
            "sparsity": report.sparsity,
            "block_sparsities": [t for _, t in targets],
            "parts": parts,
        }
        print(f"70% {label}: ppl {rows[label]['ppl']:.2f} blocks {rows[label]['block_sparsities']}", flush=True)
    return {"sparsity": sparsity, "rows": rows, "scan": scan.to_dict()}


# ---------------------------------------------------------------- markdown


def markdown(results: dict) -> str:
    out = ["# Quality targets and sensitivity allocation (issue 26)", ""]
    if "target" in results:
        t = results["target"]
        out += [
            "## Highest sparsity that meets a target (Wanda)",
            "",
            f"`prunekit prune --target` against a grid of prune + evaluate at 0.01 steps (kjv: 0.01 steps over "
            f"[{t['fine_window'][0]:.2f}, {t['fine_window'][1]:.2f}], 0.1 steps outside; digits: 0.01 to 0.99).",
            "",
            "| model | target | found | trials | grid maximum | difference |",
            "|---|---|---|---|---|---|",
        ]
        out += [
            f"| {r['model']} | `{r['target']}` | {r['found']:.2f} | {r['trials']} | {r['grid_max']:.2f} | "
            f"{r['error']:.2f} |"
            for r in t["rows"]
        ]
        out.append("")
    if "allocation" in results:
        a = results["allocation"]
        dense = next(iter(a["rows"].values()))["ppl_dense"]
        out += [
            f"## kjv-llama-5m at {a['sparsity']:.0%} (Wanda): allocations",
            "",
            f"Test perplexity (dense {dense:.2f}). The scan prunes each block alone at 0.5/0.7/0.9, measured on 64 "
            "windows held out of kjv/train.txt; `lam` bounds each block's change from the target (0.08 is the "
            "default, as OWL's).",
            "",
            "| allocation | ppl | sparsity | block sparsities |",
            "|---|---|---|---|",
        ]
        for label, row in a["rows"].items():
            blocks = ", ".join(f"{s:.3f}" for s in row["block_sparsities"])
            out.append(f"| {label} | {row['ppl']:.2f} | {row['sparsity']:.4f} | {blocks} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=["target", "allocation"], choices=["target", "allocation"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--scratch", type=Path, default=ROOT / "out" / "quality_target")
    args = parser.parse_args()
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.WARNING)
    path = args.out / "quality_target.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for section in args.sections:
        results[section] = (target_section if section == "target" else allocation_section)(args.out, args.scratch)
        results["versions"] = prunekit.api.versions()
        write_json(path, results)
    (args.out / "quality_target.md").write_text(markdown(results) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
