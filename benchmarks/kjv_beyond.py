"""Beyond uniform Wanda on kjv-llama-5m: OWL allocation, RIA, DSnoT refinement.

Protocol of ../shared/fixtures/METRICS.md: calibration = 128 windows of 256 tokens from kjv/train.txt
(seed 0), every Linear of the decoder layers pruned block by block, perplexity on kjv/test.txt in
non-overlapping 256-token windows. Optionally (--zeroshot SETTING...) also the accuracy on the local
kjv_cloze task (tests/data/zeroshot_task, 200 four-way verse endings) through lm-eval, at those settings.

Writes benchmarks/results/kjv_beyond.json (one PruneReport per run, with metrics), kjv_beyond.md and the
kjv_beyond_*.png plots (through prunekit.report); if benchmarks/results/kjv_weight_update.json exists, a
combined kjv_all.md report too. Run from the repository root:

    python benchmarks/kjv_beyond.py [--settings 0.5 0.6 0.7 0.8 2:4] [--zeroshot 0.5 0.7] [--resume]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

import prunekit
from prunekit.data import load_text, tokenize
from prunekit.eval import perplexity
from prunekit.io import write_json
from prunekit.report import build_report, pivot_table, run_setting

FIXTURES = Path("../shared/fixtures")
RESULTS = Path("benchmarks/results")
TASKS = Path("tests/data/zeroshot_task")
SEQLEN = 256

# label -> prunekit.prune keyword arguments
VARIANTS = {
    "wanda": dict(method="wanda"),
    "wanda+owl": dict(method="wanda", allocation="owl"),
    "ria": dict(method="ria"),
    "wanda+dsnot": dict(method="wanda", update="dsnot"),
}


def load_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(FIXTURES / "kjv-llama-5m").eval()


def run_one(label: str, setting: str, tokenizer, test_tokens: torch.Tensor, dense: dict, zeroshot: bool) -> dict:
    """Prune a fresh copy of the fixture with one variant at one setting and measure it."""
    model = load_model()
    report = prunekit.prune(
        model,
        **parse_setting(setting),
        calib=FIXTURES / "kjv/train.txt",
        tokenizer=tokenizer,
        nsamples=128,
        seqlen=SEQLEN,
        seed=0,
        **VARIANTS[label],
    )
    report.metrics.update(ppl_dense=dense["ppl"], ppl=perplexity(model, test_tokens, SEQLEN), eval_seqlen=SEQLEN)
    if zeroshot:
        report.metrics["zeroshot"] = kjv_cloze(model, tokenizer)
        report.metrics["zeroshot_dense"] = dense["zeroshot"]
    return {"label": label, **report.to_dict()}


def kjv_cloze(model, tokenizer) -> dict:
    from prunekit.eval.zeroshot import zeroshot

    return zeroshot(model, tokenizer, ["kjv_cloze"], batch_size=16, include_path=TASKS)


def dense_metrics(tokenizer, test_tokens: torch.Tensor, zeroshot: bool) -> dict:
    model = load_model()
    out = {"ppl": perplexity(model, test_tokens, SEQLEN)}
    if zeroshot:
        out["zeroshot"] = kjv_cloze(model, tokenizer)
    return out


def parse_setting(setting: str) -> dict:
    """``"0.7"`` -> 70% unstructured, ``"2:4"`` -> the pattern (at 50%): ``prunekit.prune`` keyword arguments."""
    return {"sparsity": 0.5, "pattern": setting} if ":" in setting else {"sparsity": float(setting), "pattern": None}


def skipped(label: str, setting: str) -> bool:
    """OWL changes per-layer sparsity; an N:M pattern fixes it, so wanda+owl at 2:4 is plain Wanda."""
    return "owl" in label and ":" in setting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["0.5", "0.6", "0.7", "0.8", "2:4"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--zeroshot", nargs="*", default=[], help="settings at which to also score kjv_cloze")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in kjv_beyond.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.WARNING)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "kjv-llama-5m")
    test_tokens = tokenize(tokenizer, load_text(FIXTURES / "kjv/test.txt"))
    out = RESULTS / "kjv_beyond.json"
    saved = json.loads(out.read_text()) if args.resume and out.exists() else {}
    dense = saved.get("dense") or dense_metrics(tokenizer, test_tokens, bool(args.zeroshot))
    print(f"dense ppl {dense['ppl']:.2f}", flush=True)
    runs = saved.get("runs", [])
    done = {(r["label"], run_setting(r)) for r in runs}
    for setting in args.settings:
        for label in args.variants:
            if skipped(label, setting) or (label, run_setting({"settings": parse_setting(setting)})) in done:
                continue
            start = time.perf_counter()
            runs.append(run_one(label, setting, tokenizer, test_tokens, dense, setting in args.zeroshot))
            print(
                f"{label:12s} {setting:>4s}  ppl {runs[-1]['metrics']['ppl']:8.2f}  "
                f"({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
            write_json(out, {"protocol": __doc__.split("\n\n")[1], "dense": dense, "runs": runs})
    write_reports(out)


def write_reports(results: Path) -> None:
    build_report([results], RESULTS, title="kjv-llama-5m: OWL, RIA, DSnoT", name="kjv_beyond")
    runs = json.loads(results.read_text())["runs"]
    print(pivot_table(runs, "ppl"))
    other = RESULTS / "kjv_weight_update.json"
    if other.exists():
        try:
            build_report([results, other], RESULTS, title="kjv-llama-5m: all methods", name="kjv_all")
        except (ValueError, KeyError, TypeError) as err:  # their format may differ: report, don't fail the run
            print(f"could not combine with {other}: {err}")


if __name__ == "__main__":
    main()
