"""Mask selection vs computing the Wanda score it selects from, on 7B-shaped fp32 matrices, in the same run.
Shipped selection (compiled CPU kernels where they apply), the torch path (``kernels=False``: what CUDA
runs) and the previous selection (``kthvalue`` + tie ``cumsum`` over the whole matrix), every mask checked
bit-identical to the previous one. Prints ratios; writes benchmarks/results/selection.{json,md}.

    python benchmarks/selection.py [--repeats 3] [--threads 2] [--chunk 23]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # huge pages, as the prunekit command sets them

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prunekit.selection as selection  # noqa: E402
from prunekit import kernels  # noqa: E402
from prunekit.groups import select_global, select_mask  # noqa: E402
from prunekit.selection import select_nm  # noqa: E402

SHAPES = [(11008, 4096), (4096, 11008)]


def old_prune_lowest(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """The selection before issue 18 (prunekit.selection._prune_lowest applied to the whole matrix)."""
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    kth = scores.kthvalue(k, dim=dim, keepdim=True).values
    below, ties = scores < kth, scores == kth
    still_needed = k - below.sum(dim=dim, keepdim=True)
    return ~(below | (ties & (ties.cumsum(dim=dim) <= still_needed)))


def old_select(scores: torch.Tensor, name: str) -> torch.Tensor:
    rows, cols = scores.shape
    if name == "per-output 50%":
        return old_prune_lowest(scores, cols // 2, 1)
    if name == "per-input 50%":
        return old_prune_lowest(scores, rows // 2, 0)
    if name in ("per-layer 50%", "global 50%"):  # the old select_global: this on the float32 concatenation
        return old_prune_lowest(scores.reshape(-1), scores.numel() // 2, 0).reshape(scores.shape)
    return old_prune_lowest(scores.reshape(rows, cols // 4, 4), 2, 2).reshape(rows, cols)


def new_select(scores: torch.Tensor, name: str) -> torch.Tensor:
    if name == "2:4":
        return select_nm(scores, 2, 4)
    if name == "global 50%":  # the engine's cross-layer selection, here over one layer
        return select_global({"layer": scores}, 0.5)["layer"]
    return select_mask(scores, 0.5, name.split()[0])


SELECTIONS = ["per-output 50%", "per-layer 50%", "2:4", "per-input 50%", "global 50%"]


def numba_version() -> str | None:

    return kernels.numba.__version__ if kernels.available() else None


def torch_select(scores: torch.Tensor, name: str) -> torch.Tensor:
    """``new_select`` with the compiled kernels switched off (``kernels=False``, as the engine applies it)."""
    with kernels.enabled(False):
        return new_select(scores, name)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_shape(shape: tuple[int, int], repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    weight, norms = torch.randn(shape, generator=gen), torch.rand(shape[1], generator=gen) + 0.1
    scores = weight.abs() * norms
    times = {"score": [], **{(n, v): [] for n in SELECTIONS for v in ("new", "torch", "old")}}
    weight.abs() * norms  # warm-up, untimed: the first large allocations fault their pages in (and compiles)
    for name in SELECTIONS:
        new_select(scores, name)
        torch_select(scores, name)
        old_select(scores, name)
    for _ in range(repeats):  # interleaved: machine load falls on every measurement alike
        times["score"].append(timed(lambda: weight.abs() * norms)[0])
        for name in SELECTIONS:
            t_new, new = timed(lambda name=name: new_select(scores, name))
            t_torch, on_torch = timed(lambda name=name: torch_select(scores, name))
            t_old, old = timed(lambda name=name: old_select(scores, name))
            assert torch.equal(new, old) and torch.equal(on_torch, old), f"{name} on {shape}: masks differ"
            times[(name, "new")].append(t_new)
            times[(name, "torch")].append(t_torch)
            times[(name, "old")].append(t_old)
    score = statistics.median(times["score"])
    rows = []
    for name in SELECTIONS:
        new, old = statistics.median(times[(name, "new")]), statistics.median(times[(name, "old")])
        on_torch = statistics.median(times[(name, "torch")])
        rows.append(
            {
                "shape": list(shape),
                "selection": name,
                "score_s": score,
                "select_s": new,
                "ratio": new / score,
                "torch_select_s": on_torch,
                "torch_ratio": on_torch / score,
                "old_select_s": old,
                "old_ratio": old / score,
                "masks_identical": True,
                "seconds": {
                    "score": times["score"],
                    "select": times[(name, "new")],
                    "torch_select": times[(name, "torch")],
                    "old_select": times[(name, "old")],
                },
            }
        )
    return rows


def markdown(result: dict) -> str:
    kernels = result.get("numba")
    lines = [
        "# Mask selection vs the Wanda score (issue 18)",
        "",
        f"CPU only: {result['cpu_threads']} threads, torch {result['torch']}, numba {kernels or 'absent'}, medians "
        f"of {result['repeats']} interleaved runs after one untimed warm-up of each; "
        f"load average (1, 5, 15 min) {result['loadavg_start']} at start, "
        f"{result['loadavg_end']} at end, on {os.cpu_count()} cores; niceness {result.get('nice', 0)}; "
        f"`CHUNK` {result.get('chunk', 1 << 22)}; `THP_MEM_ALLOC_ENABLE={result.get('thp', 'unset')}`. "
        "**No GPU figure exists**: this machine has no GPU, and the code was not timed on CUDA.",
        "",
        "Ratio = selection time / time of `weight.abs() * norms` on the same matrix, same run. Shipped = what "
        "`select_mask` runs on the CPU (compiled kernels, `prunekit/kernels.py`, for rows, N:M blocks and whole "
        "layers; the torch path for columns); torch path = the same with the `kernels` setting off, what runs on "
        "CUDA; old = the previous `kthvalue` + tie `cumsum` selection. Every mask was checked bit-identical to "
        "the old one.",
        "",
        "| shape | selection | score s | shipped s | ratio | torch path s | ratio | old s | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['selection']} | {r['score_s']:.3f} | "
            f"{r['select_s']:.3f} | {r['ratio']:.2f} | {r.get('torch_select_s', math.nan):.3f} | "
            f"{r.get('torch_ratio', math.nan):.2f} | {r['old_select_s']:.3f} | {r['old_ratio']:.2f} |"
        )

    def over(names: tuple[str, ...]) -> list[str]:
        return [
            f"{r['selection']} {r['shape'][0]}x{r['shape'][1]} ({r['ratio']:.2f}x)"
            for r in result["rows"]
            if r["ratio"] > 2 and r["selection"] in names
        ]

    accepted = ("per-output 50%", "per-layer 50%", "2:4")
    missed, others = over(accepted), over(tuple(n for n in SELECTIONS if n not in accepted))
    lines += [
        "",
        "Issue 18's acceptance (per-output and per-layer 50% and 2:4 <= 2x the score): "
        + ("met." if not missed else "**not met** for " + ", ".join(missed) + ".")
        + " Other selections over 2x: "
        + (", ".join(others) if others else "none")
        + ". Per-input (columns) runs on the torch path: the compiled kernels bring one row at a time into "
        "cache, and a column's scores are strided. Global selection over one layer runs per-layer's two passes; "
        "the two differ by run-to-run spread.",
    ]
    return "\n".join(lines) + "\n"


def rewrite_markdown() -> None:
    """Regenerate the table from the recorded JSON (no timing)."""
    out = ROOT / "benchmarks" / "results"
    (out / "selection.md").write_text(markdown(json.loads((out / "selection.json").read_text())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--chunk", type=int, default=None, help="log2 of prunekit.selection.CHUNK (default: as shipped)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.chunk is not None:
        selection.CHUNK = 1 << args.chunk
    result = {
        "torch": torch.__version__,
        "numba": numba_version(),
        "cpu_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "nice": os.nice(0),
        "chunk": selection.CHUNK,
        "thp": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "gpu": None,
        "rows": [],
    }
    for shape in SHAPES:
        result["rows"] += bench_shape(shape, args.repeats)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    for r in result["rows"]:
        print(f"{r['shape']} {r['selection']:>15}: new {r['ratio']:.2f}x score, old {r['old_ratio']:.2f}x")
    out = ROOT / "benchmarks" / "results"
    (out / "selection.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "selection.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
