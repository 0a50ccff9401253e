"""Wanda prune wall time vs its floor (one calibration forward pass over the same data), and vs the
published per-sample protocol, on kjv-llama-5m. Prints ratios; writes benchmarks/results/wanda_speed.{json,md}.

    python benchmarks/wanda_speed.py [--fixtures ../shared/fixtures] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # huge pages, as the prunekit command sets them

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prunekit  # noqa: E402
from prunekit.data import load_text, random_windows, tokenize  # noqa: E402
from tests.reference import reference_wanda  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def forward_floor(model, calib: torch.Tensor, batch_size: int) -> None:
    for batch in calib.split(batch_size):
        model(input_ids=batch, use_cache=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fixtures", default=str(ROOT.parent / "shared" / "fixtures"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(args.fixtures) / "kjv-llama-5m"
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    tokens = tokenize(AutoTokenizer.from_pretrained(path), load_text(Path(args.fixtures) / "kjv" / "train.txt"))
    calib = random_windows(tokens, 128, 256, seed=0)
    rows = {"floor_forward_s": [], "prunekit_wanda_s": [], "published_protocol_s": []}
    for _ in range(args.repeats):  # interleaved so machine load affects all three alike
        rows["floor_forward_s"].append(timed(lambda: forward_floor(base, calib, args.batch_size)))
        model = copy.deepcopy(base)
        rows["prunekit_wanda_s"].append(
            timed(lambda model=model: prunekit.prune(model, "wanda", 0.5, calib=calib, batch_size=args.batch_size))
        )
        ref = copy.deepcopy(base)
        rows["published_protocol_s"].append(timed(lambda ref=ref: torch.no_grad()(reference_wanda)(ref, calib, 0.5)))
    med = {k: statistics.median(v) for k, v in rows.items()}
    result = {
        "model": "kjv-llama-5m",
        "calibration": "128 x 256 tokens",
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "seconds": rows,
        "median_s": med,
        "prune_over_floor": med["prunekit_wanda_s"] / med["floor_forward_s"],
        "published_over_prunekit": med["published_protocol_s"] / med["prunekit_wanda_s"],
    }
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "wanda_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    table = (
        "| measure | median seconds |\n|---|---|\n"
        + "".join(f"| {k} | {v:.2f} |\n" for k, v in med.items())
        + f"\n**Wanda prune / one forward pass (floor): {result['prune_over_floor']:.2f}x**; "
        f"published per-sample protocol / prunekit: {result['published_over_prunekit']:.2f}x\n"
    )
    (out / "wanda_speed.md").write_text("# Wanda speed on kjv-llama-5m (CPU)\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
