"""Prune wall time of each method, as a ratio to Wanda's time in the same run, on kjv-llama-5m (the
METRICS.md calibration: 128 x 256 tokens) and on a larger random LLaMA-shaped model (hidden 2048,
SwiGLU 5504, 2 layers by default, a few short calibration sequences). Methods run interleaved, so
machine load hits them alike; the machine is shared, so absolute seconds are noisy and the ratios are
what to read. ADMM's cost is 20 x 2 rows cols^2 flops per layer whatever the calibration size.

Writes benchmarks/results/methods_speed.{json,md}:

    python benchmarks/methods_speed.py [--fixtures ../shared/fixtures] [--repeats 1]
        [--hidden 2048 --layers 2 --nsamples 8 --seqlen 128] [--threads 2] [--skip-fixture] [--skip-large]
"""

from __future__ import annotations

import argparse
import copy
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
from prunekit.io import write_json  # noqa: E402

METHODS = {  # label -> prunekit.prune keyword arguments (50% unstructured, each method's default group)
    "wanda": {"method": "wanda"},
    "magnitude": {"method": "magnitude"},
    "sparsegpt": {"method": "sparsegpt"},
    "wanda+admm": {"method": "wanda", "update": "admm"},
    "admm-gradual": {"method": "admm-gradual"},
}
OUT = ROOT / "benchmarks" / "results"


def time_methods(base: torch.nn.Module, calib: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Seconds of ``prunekit.prune`` (calibration passes + pruning) per method, interleaved."""
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(repeats):
        for label, kwargs in METHODS.items():
            model = copy.deepcopy(base)
            start = time.perf_counter()
            prunekit.prune(model, sparsity=0.5, calib=calib, **kwargs)
            seconds[label].append(time.perf_counter() - start)
            print(f"  {label}: {seconds[label][-1]:.2f}s", flush=True)
    return seconds


def summarise(name: str, seconds: dict[str, list[float]], **info) -> dict:
    median = {m: statistics.median(v) for m, v in seconds.items()}
    ratio = {m: median[m] / median["wanda"] for m in median}
    return {"model": name, **info, "seconds": seconds, "median_s": median, "ratio_to_wanda": ratio}


def fixture_run(fixtures: Path, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = fixtures / "kjv-llama-5m"
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    tokens = tokenize(AutoTokenizer.from_pretrained(path), load_text(fixtures / "kjv" / "train.txt"))
    calib = random_windows(tokens, 128, 256, seed=0)
    print("kjv-llama-5m", flush=True)
    return summarise("kjv-llama-5m", time_methods(base, calib, repeats), calibration="128 x 256 tokens")


def large_run(hidden: int, layers: int, nsamples: int, seqlen: int, repeats: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=hidden * 43 // 16,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=max(seqlen, 128),
    )
    base = LlamaForCausalLM(config).eval()
    calib = torch.randint(0, 1024, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    name = f"random llama hidden {hidden}, {layers} layers, mlp {config.intermediate_size}"
    print(name, flush=True)
    return summarise(name, time_methods(base, calib, repeats), calibration=f"{nsamples} x {seqlen} tokens")


def markdown(runs: list[dict]) -> str:
    lines = [
        "# Prune wall time per method, relative to Wanda (CPU, shared 2-core machine)\n\n",
        "Seconds are medians of `prunekit.prune` (calibration forward passes + pruning, 50% unstructured); "
        "the machine is shared with other jobs, so absolute seconds are noisy; ratios come from one "
        "interleaved run. On an oversubscribed machine use `--threads 1`: two OpenMP threads fighting "
        "other jobs for two cores slow every method down several-fold (LAPACK calls most).\n\n",
    ]
    for run in runs:
        lines.append(f"## {run['model']} ({run['calibration']}, {run['threads']} threads)\n\n")
        lines.append("| method | seconds | x Wanda |\n|---|---|---|\n")
        lines += [f"| {m} | {run['median_s'][m]:.2f} | {run['ratio_to_wanda'][m]:.2f} |\n" for m in METHODS]
        lines.append("\n")
    return "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fixtures", default=str(ROOT.parent / "shared" / "fixtures"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--skip-fixture", action="store_true")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine has 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = [] if args.skip_fixture else [fixture_run(Path(args.fixtures), args.repeats)]
    if not args.skip_large:
        runs.append(large_run(args.hidden, args.layers, args.nsamples, args.seqlen, args.repeats))
    for run in runs:
        run.update(threads=torch.get_num_threads(), torch=torch.__version__, repeats=args.repeats)
    write_json(OUT / "methods_speed.json", runs)
    (OUT / "methods_speed.md").write_text(markdown(runs))
    print(markdown(runs))


if __name__ == "__main__":
    main()
