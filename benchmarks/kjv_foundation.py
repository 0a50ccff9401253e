"""Perplexity of kjv-llama-5m pruned with magnitude and Wanda (issue-3 protocol, METRICS.md):
calibration = 128 windows x 256 tokens of kjv/train.txt (seed 0); ppl on kjv/test.txt, 256-token windows.
Writes benchmarks/results/kjv_foundation.{json,md} with METRICS.md's reference values beside ours.

    python benchmarks/kjv_foundation.py [--fixtures ../shared/fixtures]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import prunekit
from prunekit.data import load_text, random_windows, tokenize
from prunekit.eval import perplexity

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [("50%", 0.5, None), ("60%", 0.6, None), ("70%", 0.7, None), ("2:4", 0.5, "2:4"), ("4:8", 0.5, "4:8")]
REFERENCE = {  # METRICS.md: the published Wanda code on this checkpoint
    "magnitude": {"50%": 47.62, "60%": 49.53, "70%": 57.29, "2:4": 49.86, "4:8": 48.56},
    "wanda": {"50%": 47.86, "60%": 49.76, "70%": 57.09, "2:4": 49.50, "4:8": 48.59},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fixtures", default=str(ROOT.parent / "shared" / "fixtures"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(args.fixtures) / "kjv-llama-5m"
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    calib = random_windows(tokenize(tok, load_text(Path(args.fixtures) / "kjv" / "train.txt")), 128, 256, seed=0)
    test = tokenize(tok, load_text(Path(args.fixtures) / "kjv" / "test.txt"))
    results = {"dense": perplexity(base, test, 256), "runs": []}
    for method in ("magnitude", "wanda"):
        for label, sparsity, pattern in SETTINGS:
            model = copy.deepcopy(base)
            report = prunekit.prune(model, method, sparsity, pattern, calib=calib)
            ppl = perplexity(model, test, 256)
            results["runs"].append(
                {
                    "method": method,
                    "setting": label,
                    "ppl": ppl,
                    "sparsity": report.sparsity,
                    "prune_s": report.timings["total_s"],
                    "reference": REFERENCE[method][label],
                }
            )
            print(method, label, f"{ppl:.2f}", "(reference", REFERENCE[method][label], ")", flush=True)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "kjv_foundation.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# kjv-llama-5m perplexity (dense {results['dense']:.2f}; reference = published code, METRICS.md)\n",
        "| setting | magnitude | (ref) | Wanda | (ref) |",
        "|---|---|---|---|---|",
    ]
    by = {(r["method"], r["setting"]): r for r in results["runs"]}
    for label, _, _ in SETTINGS:
        m, w = by[("magnitude", label)], by[("wanda", label)]
        lines.append(f"| {label} | {m['ppl']:.2f} | {m['reference']:.2f} | {w['ppl']:.2f} | {w['reference']:.2f} |")
    (out / "kjv_foundation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
