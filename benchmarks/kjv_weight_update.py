"""Mask criteria vs weight-update methods on kjv-llama-5m: perplexity of magnitude, Wanda, SparseGPT,
Wanda + ADMM update and ADMM-gradual at 50/60/70/80% unstructured and 2:4 (protocol in METRICS.md:
128 x 256-token calibration windows from kjv/train.txt, seed 0; ppl on kjv/test.txt, 256-token windows).

Writes benchmarks/results/kjv_weight_update.{json,md} after every cell, so a long run can be resumed:

    python benchmarks/kjv_weight_update.py [--fixtures ../shared/fixtures] [--resume]
        [--methods sparsegpt admm-gradual] [--settings 0.7 2:4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prunekit  # noqa: E402
from prunekit.data import load_text, random_windows, tokenize  # noqa: E402
from prunekit.eval import perplexity  # noqa: E402
from prunekit.io import write_json  # noqa: E402

METHODS = {  # label -> prunekit.prune keyword arguments
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
    "wanda+admm": {"method": "wanda", "update": "admm"},
    "admm-gradual": {"method": "admm-gradual"},
}
SETTINGS = ["0.5", "0.6", "0.7", "0.8", "2:4"]
# METRICS.md: the published SparseGPT code (via locuslab/wanda) on this checkpoint, same protocol.
REFERENCE_SPARSEGPT = {"0.5": 46.82, "0.6": 47.12, "0.7": 48.12, "0.8": 52.83, "2:4": 46.99}
OUT = ROOT / "benchmarks" / "results"


def setting_kwargs(setting: str) -> dict:
    return {"sparsity": 0.5, "pattern": setting} if ":" in setting else {"sparsity": float(setting)}


def run_cell(path: Path, calib: torch.Tensor, test: torch.Tensor, label: str, setting: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    start = time.perf_counter()
    report = prunekit.prune(model, calib=calib, **METHODS[label], **setting_kwargs(setting))
    prune_s = time.perf_counter() - start
    return {
        "ppl": perplexity(model, test, 256),
        "sparsity": report.sparsity,
        "prune_s": prune_s,
        "group": report.settings["group"],
    }


def table(results: dict) -> str:
    labels = [m for m in METHODS if any(f"{m}@{s}" in results["cells"] for s in SETTINGS)]
    head = "| setting | " + " | ".join(labels) + " | SparseGPT ref. (METRICS.md) |\n"
    lines = [head, "|---" * (len(labels) + 2) + "|\n"]
    for s in SETTINGS:
        cells = [results["cells"].get(f"{m}@{s}") for m in labels]
        name = s if ":" in s else f"{float(s):.0%}"
        lines.append(
            f"| {name} | "
            + " | ".join(f"{c['ppl']:.2f}" if c else "" for c in cells)
            + f" | {REFERENCE_SPARSEGPT[s]:.2f} |\n"
        )
    return "".join(lines)


def write(results: dict) -> None:
    write_json(OUT / "kjv_weight_update.json", results)
    md = (
        "# Weight update vs mask criteria on kjv-llama-5m (CPU, fp32)\n\n"
        f"Perplexity on kjv/test.txt (dense {results['dense_ppl']:.2f}); 128 x 256 calibration windows, "
        "seed 0; every Linear in the decoder layers pruned, sequentially; each method's default group "
        "(magnitude per-layer, Wanda / Wanda+ADMM / ADMM-gradual per-output, SparseGPT per-layer within "
        f"each block of 128 columns). torch {results['torch']}, {results['threads']} thread(s).\n\n" + table(results)
    )
    (OUT / "kjv_weight_update.md").write_text(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fixtures", default=str(ROOT.parent / "shared" / "fixtures"))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--settings", nargs="*", default=SETTINGS, choices=SETTINGS)
    parser.add_argument("--resume", action="store_true", help="keep cells already in the JSON")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine has 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(args.fixtures) / "kjv-llama-5m"
    tok = AutoTokenizer.from_pretrained(path)
    calib = random_windows(tokenize(tok, load_text(Path(args.fixtures) / "kjv" / "train.txt")), 128, 256, seed=0)
    test = tokenize(tok, load_text(Path(args.fixtures) / "kjv" / "test.txt"))
    old = OUT / "kjv_weight_update.json"
    results = json.loads(old.read_text()) if args.resume and old.exists() else {"cells": {}}
    if "dense_ppl" not in results:
        results["dense_ppl"] = perplexity(AutoModelForCausalLM.from_pretrained(path).eval(), test, 256)
    results.update(torch=torch.__version__, threads=torch.get_num_threads())
    for setting in args.settings:
        for label in args.methods:
            key = f"{label}@{setting}"
            if key not in results["cells"]:
                results["cells"][key] = run_cell(path, calib, test, label, setting)
                print(key, json.dumps(results["cells"][key]), flush=True)
                write(results)
    write(results)
    print(table(results))


if __name__ == "__main__":
    main()
