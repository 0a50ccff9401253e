"""What a sensitivity scan costs next to one full prune + evaluation, measured in one run (issue 26).

On kjv-llama-5m, one after the other and ``--repeats`` times (medians reported), each as the job a user runs:

* ``prune + eval``: ``prunekit prune`` with Wanda at 50% (128 windows x 256 tokens of kjv/train.txt, seed 0), with
  perplexity on kjv/test.txt before and after (the issue's "one full Wanda prune + eval");
* ``scan``: ``prunekit sensitivity``, every block x 0.5/0.7/0.9, measured on the default 64 windows held out of the
  calibration text (the statistics collected once on the dense model, each trial one block's masks + one
  evaluation);
* ``scan on test.txt``: the same scan measured on all of kjv/test.txt (``--eval-data``), for reference.

Untimed warm-ups of each job first (imports, compiled selection kernels). A timing: run it on an idle machine.

    python benchmarks/sensitivity_speed.py [--repeats 3] [--quick]

``--quick`` checks the script in a minute (16 calibration windows, 8 held out, the 300-verse test-small.txt) and
writes nothing unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

import torch

import prunekit
from prunekit.commands import run_prune
from prunekit.io import write_json
from prunekit.quality import run_sensitivity
from prunekit.recipe import PruneRecipe, SensitivityRecipe

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


def jobs(quick: bool) -> dict[str, callable]:
    common = dict(
        model=str(FIXTURES / "kjv-llama-5m"),
        method="wanda",
        calib_data=str(FIXTURES / "kjv" / "train.txt"),
        nsamples=16 if quick else 128,
        seqlen=256,
        seed=0,
    )
    test = str(ROOT / "prunekit" / "assets" / "kjv" / "test-small.txt") if quick else str(FIXTURES / "kjv" / "test.txt")
    holdout = {"holdout": 8} if quick else {}
    return {
        "prune + eval": lambda: run_prune(PruneRecipe(**common, sparsity=0.5, eval_data=test)),
        "scan": lambda: run_sensitivity(SensitivityRecipe(**common, **holdout)),
        "scan on test.txt": lambda: run_sensitivity(SensitivityRecipe(**common, eval_data=test)),
    }


def timed(job) -> float:
    start = time.perf_counter()
    job()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results (none with --quick)")
    args = parser.parse_args()
    out = args.out or (None if args.quick else ROOT / "benchmarks" / "results")
    torch.set_num_threads(2)
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.WARNING)
    warm = jobs(quick=True)
    for job in warm.values():
        job()
    measured = jobs(args.quick)
    times: dict[str, list[float]] = {name: [] for name in measured}
    for _ in range(args.repeats):
        for name, job in measured.items():
            times[name].append(timed(job))
            print(f"{name}: {times[name][-1]:.1f}s", flush=True)
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["prune + eval"]
    result = {
        "quick": args.quick,
        "repeats": args.repeats,
        "seconds": times,
        "median_s": median,
        "ratio_to_prune_eval": {name: m / base for name, m in median.items()},
        "load_at_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "versions": prunekit.api.versions(),
    }
    lines = [
        "# Sensitivity scan cost (kjv-llama-5m, every block x 3 sparsities)",
        "",
        f"Median of {args.repeats} runs each, in one run of benchmarks/sensitivity_speed.py; "
        f"{os.cpu_count()} CPUs, load average {result['load_at_end'][0]:.2f} at the end.",
        "",
        "| job | median s | / prune + eval |",
        "|---|---|---|",
        *(f"| {name} | {median[name]:.1f} | {median[name] / base:.2f}x |" for name in measured),
    ]
    print("\n".join(lines))
    if out is not None:
        write_json(out / "sensitivity_speed.json", result)
        (out / "sensitivity_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
