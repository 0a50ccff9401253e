"""Structured pruning on kjv-llama-5m: perplexity and CPU throughput of depth, width and SliceGPT-style slicing.

Protocol (../shared/fixtures/METRICS.md): calibration = 128 windows x 256 tokens of kjv/train.txt (seed 0);
perplexity = kjv/test.txt in non-overlapping 256-token windows. Every pruned model is saved with
``save_pretrained`` and reloaded with ``from_pretrained`` before it is measured, so the numbers are those of
the checkpoint a user gets. Throughput is a forward pass over ``--batch`` x 256 tokens on CPU with one torch
thread; the machine is shared, so each timing is the fastest of 3 back-to-back passes, dense and pruned timings
are interleaved (alternating which goes first), the speedup is the median of the per-pair ratios, and process
CPU time is reported next to wall-clock time.

    python benchmarks/structured.py            # writes benchmarks/results/structured.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunekit.api import versions
from prunekit.data import calibration_batches, load_text, tokenize
from prunekit.eval import perplexity
from prunekit.io import write_json
from prunekit.structured import STRUCTURED

ROOT = Path(__file__).resolve().parents[1]
METHODS = [
    ("depth (cosine)", "depth", {"score": "cosine"}),
    ("depth (ppl)", "depth", {"score": "ppl"}),
    ("depth (Taylor)", "depth", {"score": "taylor"}),
    ("depth (Taylor+)", "depth", {"score": "taylor", "keep_first": 1, "keep_last": 1}),
    ("width (Wanda-sp)", "width", {}),
    ("width (magnitude)", "width", {"score": "magnitude"}),
    ("width (Taylor)", "width", {"score": "taylor"}),
    ("width (head_ratio 0.5)", "width", {"head_ratio": 0.5}),
    ("slicegpt (global Q)", "slicegpt", {}),
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", default=str(ROOT / ".." / "shared" / "fixtures"))
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--methods", nargs="+", default=[m[0] for m in METHODS])
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="sequences per timed forward pass")
    p.add_argument("--reps", type=int, default=15, help="interleaved dense/pruned timing repetitions")
    p.add_argument("--threads", type=int, default=2, help="torch threads for pruning and perplexity")
    p.add_argument("--timing-threads", type=int, default=1, help="torch threads while timing")
    p.add_argument(
        "--skip-timing",
        action="store_true",
        help="measure quality only (no throughput, no prune time): for a machine shared with other jobs",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "structured"))
    p.add_argument(
        "--append",
        action="store_true",
        help="add rows to the existing OUT.json (same settings required; rows re-measured now "
        "replace the saved ones) instead of starting anew",
    )
    return p.parse_args()


@torch.no_grad()
def forward_cost(model, tokens: torch.Tensor, repeat: int = 3) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one forward pass, each the minimum of ``repeat`` back-to-back passes:
    the minimum filters out the times the process waited for a core on the shared machine."""
    wall, cpu = float("inf"), float("inf")
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        model(input_ids=tokens, use_cache=False)
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu


def interleaved_timing(dense, pruned, tokens: torch.Tensor, reps: int, threads: int) -> dict:
    """Time the two models alternately (which goes first alternates too) so that load changes on the shared
    machine hit both alike; speedup = median over reps of the ratio of the two adjacent timings. Timed with
    ``threads`` torch threads (1 by default: with 2, every op waits for the later-scheduled thread)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m in (dense, pruned):  # warm-up
            forward_cost(m, tokens)
        costs = {"dense": [], "pruned": []}
        for rep in range(reps):
            for key, model in [("dense", dense), ("pruned", pruned)][:: 1 if rep % 2 == 0 else -1]:
                costs[key].append(forward_cost(model, tokens))
    finally:
        torch.set_num_threads(previous)
    return {**_speed(costs, tokens.numel(), 0, "wall"), **_speed(costs, tokens.numel(), 1, "cpu")}


def _speed(costs: dict, n_tokens: int, which: int, tag: str) -> dict:
    dense, pruned = ([c[which] for c in costs[k]] for k in ("dense", "pruned"))
    ratios = [d / p for d, p in zip(dense, pruned)]
    return {
        f"tokens_per_s_dense_{tag}": n_tokens / statistics.median(dense),
        f"tokens_per_s_pruned_{tag}": n_tokens / statistics.median(pruned),
        f"speedup_{tag}": statistics.median(ratios),
        f"speedup_{tag}_range": [min(ratios), max(ratios)],
    }


def reloaded(model, tokens: torch.Tensor):
    """Save and load the pruned model; its logits must be identical to the in-memory model's."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
    with torch.no_grad():
        if not torch.equal(loaded(tokens).logits, model(tokens).logits):
            raise RuntimeError("the reloaded checkpoint does not reproduce the pruned model")
    return loaded


def fingerprint(model) -> str:
    """Hash of every parameter: depth pruning at 10/20/30% of 4 blocks removes the same block each time."""
    digest = hashlib.sha1()
    for name, p in model.state_dict().items():
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_one(
    dense, label: str, name: str, params: dict, ratio: float, batches, test, timing_tokens, args, ppl_cache: dict
) -> dict:
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    summary = STRUCTURED.create(name, params).prune_model(model, batches, ratio)
    prune_s = None if args.skip_timing else time.perf_counter() - start
    model = reloaded(model, timing_tokens[:1])
    key = fingerprint(model)  # identical models (same blocks removed) are evaluated once
    if key not in ppl_cache:
        ppl_cache[key] = perplexity(model, test, args.seqlen, batch_size=8)
    ppl = ppl_cache[key]
    row = {
        "method": label,
        "name": name,
        "params": params,
        "ratio": ratio,
        "ppl": ppl,
        "prune_s": prune_s,
        **({} if args.skip_timing else interleaved_timing(dense, model, timing_tokens, args.reps, args.timing_threads)),
        **{k: v for k, v in summary.items() if k not in ("removed_units", "block_scores", "layer_sizes")},
    }
    logging.info("%s @ %.0f%%: ppl %.2f, removed %.1f%%", label, 100 * ratio, ppl, 100 * summary["removed_fraction"])
    return row


def _detail(row: dict) -> str:
    if row["name"] == "depth":
        return f"blocks removed {row['removed_blocks']}"
    if row["name"] == "slicegpt":
        return f"hidden {row['hidden_before']}→{row['hidden_after']}, variance kept {row['variance_kept']:.3f}"
    cfg = row["config"]
    return (
        f"heads {cfg['num_attention_heads']}/{cfg['num_key_value_heads']} kv, intermediate {cfg['intermediate_size']}"
    )


def markdown(result: dict) -> str:
    load = f"{min(result['load_average']):.1f}–{max(result['load_average']):.1f}"
    lines = [
        "# Structured pruning on kjv-llama-5m (CPU)",
        "",
        f"Dense perplexity {result['dense_ppl']:.2f} (kjv/test.txt, 256-token windows). Calibration "
        f"{result['nsamples']} x {result['seqlen']} tokens of kjv/train.txt, seed 0. *Removed*: fraction of "
        "the decoder-layer parameters actually removed (*model*: of all parameters). Every pruned model was "
        "saved and reloaded with `from_pretrained` before it was measured.",
        "",
        f"Throughput: one forward pass over {result['batch']} x {result['seqlen']} tokens with "
        f"{result['timing_threads']} torch thread(s); each measurement is the fastest of 3 back-to-back "
        f"passes; dense and pruned are timed alternately {result['reps']} times in the same process; tok/s "
        "are medians, speedup is the median of the per-pair ratios (range in brackets). *wall* = elapsed "
        "time, *cpu* = process CPU time. The machine (2 cores) was shared with other jobs (1-minute load "
        f"average sampled after each row: {load}), so wall-clock numbers are noisy; CPU time is the steadier "
        "measure of compute.",
        "",
        "| method | target | removed (decoder) | removed (model) | ppl | tok/s dense (wall) | tok/s pruned "
        "(wall) | speedup wall | speedup cpu | prune s | structure |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['ratio']:.0%} | {r['removed_fraction']:.1%} | "
            f"{r['model_removed_fraction']:.1%} | {r['ppl']:.2f} | {_tokens(r, 'dense')} | "
            f"{_tokens(r, 'pruned')} | {_ratio(r, 'wall')} | {_ratio(r, 'cpu')} | "
            f"{_seconds(r)} | {_detail(r)} |"
        )
    if any("speedup_wall" not in r for r in result["rows"]):
        lines += ["", "–: measured for quality only (`--skip-timing`), on a machine shared with other jobs."]
    text = "\n".join(lines) + "\n"
    return text + norms_markdown(result["slicegpt_norms"]) if "slicegpt_norms" in result else text


def norms_markdown(section: dict) -> str:
    """The SliceGPT table of ``benchmarks/structured_slicegpt.py``: an RMSNorm and a LayerNorm model side by side."""
    lines = [
        "",
        "## SliceGPT on an RMSNorm and a LayerNorm model",
        "",
        f"Calibration {section['nsamples']} x {section['seqlen']} tokens of kjv/train.txt (seed 0), perplexity on "
        "kjv/test.txt in 256-token windows. *Slicing* is what the target is a fraction of: `width`, the hidden width "
        "(SliceGPT's slicing, as in its tables), or `params`, the decoder-layer parameters (prunekit's default). "
        "Every sliced model was saved and reloaded (*loads with*) and gave identical logits. *Published code*: "
        "microsoft/TransformerCompression on kjv-llama-5m (../shared/fixtures/METRICS.md; its 512-token calibration "
        "windows and per-block rotations, whose shortcut matrices it counts) at the same slicing of the width, or, "
        "beside `params` 12.5%, at the slicing that leaves as many parameters.",
        "",
        "| model | norm | slicing | target | hidden | params (model) | removed (decoder) | ppl (dense) | "
        "variance kept | loads with | published code, slicing: params / ppl |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in section["rows"]:
        paper = r.get("published")
        lines.append(
            f"| {r['model']} | {r['norm']} | {r['slicing']} | {100 * r['ratio']:g}% | {r['hidden_before']}→"
            f"{r['hidden_after']} | {r['model_params_after']:,} | {r['removed_fraction']:.1%} | {r['ppl']:.2f} "
            f"({r['dense_ppl']:.2f}) | {r['variance_kept']:.3f} | {r['loads_with']} | "
            + (f"{paper['slicing']:.2f}: {paper['params']:,} / {paper['ppl']:.2f} |" if paper else "– |")
        )
    return "\n".join(lines) + "\n"


def _tokens(row: dict, which: str) -> str:
    value = row.get(f"tokens_per_s_{which}_wall")
    return "–" if value is None else f"{value:.0f}"


def _seconds(row: dict) -> str:
    return "–" if row.get("prune_s") is None else f"{row['prune_s']:.1f}"


def _ratio(row: dict, tag: str) -> str:
    if f"speedup_{tag}" not in row:
        return "–"
    low, high = row[f"speedup_{tag}_range"]
    return f"{row[f'speedup_{tag}']:.2f}x ({low:.2f}–{high:.2f})"


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    fixtures = Path(args.fixtures)
    tok = AutoTokenizer.from_pretrained(fixtures / "kjv-llama-5m")
    dense = AutoModelForCausalLM.from_pretrained(fixtures / "kjv-llama-5m").eval()
    test = tokenize(tok, load_text(fixtures / "kjv" / "test.txt"))
    batches = calibration_batches(str(fixtures / "kjv" / "train.txt"), tok, args.nsamples, args.seqlen, 0, 8)
    timing_tokens = test[: args.batch * args.seqlen].view(args.batch, args.seqlen)
    result = previous_result(args) if args.append else new_result(args, perplexity(dense, test, args.seqlen, 8))
    ppl_cache: dict[str, float] = {}
    for label, name, params in (m for m in METHODS if m[0] in args.methods):
        for ratio in args.ratios:
            result["rows"].append(
                run_one(dense, label, name, params, ratio, batches, test, timing_tokens, args, ppl_cache)
            )
            if not args.skip_timing:
                result["load_average"].append(os.getloadavg()[0])
            result["rows"].sort(key=lambda r: ([m[0] for m in METHODS].index(r["method"]), r["ratio"]))
            write_results(result, Path(args.out))  # after every row: a long run that fails keeps what it measured
    print(markdown(result))


SETTINGS = ("nsamples", "seqlen", "batch", "reps", "threads", "timing_threads")


def new_result(args: argparse.Namespace, dense_ppl: float) -> dict:
    result = {
        "model": "kjv-llama-5m",
        "dense_ppl": dense_ppl,
        **{k: getattr(args, k) for k in SETTINGS},
        "versions": versions(),
        "rows": [],
        "load_average": [],
    }
    saved = Path(args.out).with_suffix(".json")  # benchmarks/structured_slicegpt.py's section stays
    if saved.is_file() and "slicegpt_norms" in (old := json.loads(saved.read_text())):
        result["slicegpt_norms"] = old["slicegpt_norms"]
    return result


def previous_result(args: argparse.Namespace) -> dict:
    """The earlier run's results, to extend with more rows; its settings must be the ones asked for now."""
    result = json.loads(Path(args.out).with_suffix(".json").read_text())
    differ = {k: (result[k], getattr(args, k)) for k in SETTINGS if result[k] != getattr(args, k)}
    if differ:
        raise ValueError(f"--append: settings differ from the saved run (saved, now): {differ}")
    labels = [m[0] for m in METHODS]  # rows being re-measured, or of methods no longer listed, are dropped
    result["rows"] = [
        r
        for r in result["rows"]
        if r["method"] in labels and not (r["method"] in args.methods and r["ratio"] in args.ratios)
    ]
    return result


def write_results(result: dict, out: Path) -> None:
    write_json(out.with_suffix(".json"), result)
    out.with_suffix(".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
