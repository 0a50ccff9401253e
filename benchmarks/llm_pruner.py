"""prunekit's Taylor width against the published LLM-Pruner code on kjv-llama-5m: parameter counts, perplexity and
how many of the code's keep / remove choices prunekit makes the same, per layer.

The published code's choices come from ``benchmarks/llm_pruner_reference.py`` (run it first; it needs the
fetched repository), which writes ``benchmarks/results/llm_pruner_reference.json``. Both use the same 10
calibration windows of 64 tokens (prunekit's ``--nsamples 10 --seqlen 64 --seed 0``, LLM-Pruner's default
count and length); perplexity on kjv/test.txt in 256-token windows. LLM-Pruner's ratio is the fraction of units
removed in each pruned layer; prunekit's is a fraction of parameters, so ``--sparsity 0.1461`` / ``0.5`` give
the same sizes (138 of 688 MLP channels and no KV group / 344 channels and 2 of 4 KV groups). Every prunekit
model is saved with ``prunekit.save`` and reloaded with ``prunekit.load`` (blocks of different sizes included)
before it is measured.

    python benchmarks/llm_pruner_reference.py --repo /work/ref/LLM-Pruner
    python benchmarks/llm_pruner.py            # writes benchmarks/results/llm_pruner.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import prunekit
from prunekit.api import versions
from prunekit.data import calibration_batches, load_text, tokenize
from prunekit.eval import perplexity
from prunekit.io import write_json
from prunekit.structured import STRUCTURED

ROOT = Path(__file__).resolve().parents[1]
SPARSITY = {0.2: 0.1461, 0.5: 0.5}  # prunekit's --sparsity for LLM-Pruner's ratio on this model
PUBLISHED = {  # METRICS.md, the published code's perplexity as first recorded
    (0.2, (0, 3), "param_first"): 47.145,
    (0.5, (0, 3), "param_first"): 104.845,
    (0.2, (1, 2), "param_first"): 46.745,
    (0.5, (1, 2), "param_first"): 49.648,
    (0.2, (0, 3), "vectorize"): 47.425,
    (0.5, (0, 3), "vectorize"): 111.258,
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", default=str(ROOT / ".." / "shared" / "fixtures"))
    p.add_argument("--reference", default=str(ROOT / "benchmarks" / "results" / "llm_pruner_reference.json"))
    p.add_argument("--alignments", nargs="+", default=["strided", "grouped"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llm_pruner"))
    return p.parse_args()


def width_params(run: dict, alignment: str) -> dict:
    params = {"score": "taylor", "taylor": run["taylor"], "reduction": run["reduction"], "alignment": alignment}
    first, last = run["layers"]
    return params if (first, last) == (0, 3) else {**params, "layers": f"{first}-{last}"}


def agreement(ours: dict, theirs: dict) -> dict[str, float]:
    """Per group (``"1.heads"``): the fraction of units both keep or both remove, and per block both kinds together."""
    found, blocks = {}, {}
    for key, ref in theirs.items():
        block, kind = key.split(".")
        units = ref["units"]
        removed = set(ours[f"model.layers.{block}.{'self_attn' if kind == 'heads' else 'mlp'}"]["removed"])
        same = sum((u in removed) == (u not in ref["kept"]) for u in range(units))
        found[key] = same / units
        total = blocks.setdefault(block, [0, 0])
        total[0], total[1] = total[0] + same, total[1] + units
    found.update({f"{b}.all": same / units for b, (same, units) in blocks.items()})
    return found


def reloaded(model, tokens: torch.Tensor):
    """Save with prunekit.save and load with prunekit.load; the logits must be the pruned model's."""
    with tempfile.TemporaryDirectory() as tmp:
        prunekit.save(model, Path(tmp) / "m")
        loaded = prunekit.load(Path(tmp) / "m")
    with torch.no_grad():
        if not torch.equal(loaded(tokens).logits, model(tokens).logits):
            raise RuntimeError("the reloaded checkpoint does not reproduce the pruned model")
    return loaded


def fingerprint(model) -> str:
    digest = hashlib.sha1()
    for name, p in model.state_dict().items():
        digest.update(name.encode() + p.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_row(dense, run: dict, alignment: str, batches, test, cache: dict) -> dict:
    model = copy.deepcopy(dense)
    params = width_params(run, alignment)
    summary = STRUCTURED.create("width", params).prune_model(model, batches, SPARSITY[run["ratio"]])
    model = reloaded(model, test[None, :256])
    key = fingerprint(model)
    if key not in cache:
        cache[key] = perplexity(model, test, 256)
    cell = (run["ratio"], tuple(run["layers"]), run["taylor"])
    row = {
        "ratio": run["ratio"],
        "layers": run["layers"],
        "taylor": run["taylor"],
        "alignment": alignment,
        "params": params,
        "sparsity": SPARSITY[run["ratio"]],
        "params_after": sum(p.numel() for p in model.parameters()),
        "reference_params_after": run["params_after"],
        "ppl": cache[key],
        "reference_ppl": run["ppl"],
        "published_ppl": PUBLISHED.get(cell),
        "agreement": agreement(summary["removed_units"], run["units"]),
        "reload": summary["reload"],
    }
    row["ppl_vs_reference"] = row["ppl"] / row["reference_ppl"] - 1
    print(
        f"{run['taylor']} {alignment} ratio {run['ratio']} layers {run['layers']}: {row['params_after']:,} params "
        f"(LLM-Pruner {run['params_after']:,}), ppl {row['ppl']:.3f} (LLM-Pruner {run['ppl']:.3f}), "
        f"min agreement {min(row['agreement'].values()):.3f}",
        flush=True,
    )
    return row


def markdown(result: dict) -> str:
    lines = [
        "# Taylor width vs the published LLM-Pruner code (kjv-llama-5m, CPU)",
        "",
        f"Dense perplexity {result['dense_ppl']:.3f} (kjv/test.txt, 256-token windows). Calibration: 10 windows x 64 "
        "tokens of kjv/train.txt, seed 0, the same tensor for both. LLM-Pruner = horseee/LLM-Pruner 128a07d, "
        "`llama3.py --block_wise --pruner_type taylor` (its pruner and `TaylorImportance` unchanged; driver "
        "`benchmarks/llm_pruner_reference.py`); *published* = METRICS.md. prunekit = `width` with "
        "`score=taylor`, `--sparsity 0.1461` (ratio 0.2) / `0.5`, `layers=1-2` for the layer-range cells, "
        "saved and reloaded with `prunekit.load` before measuring.",
        "",
        "*alignment*: `strided` reproduces LLM-Pruner's code, which scores KV group j with query heads j, j+4 "
        "(its `view(len // min, min).sum(0)` fold) while it removes query heads 2j, 2j+1 with it; `grouped` "
        "(prunekit's default) scores each KV group with its own query heads. *agreement*: fraction of the "
        "keep/remove choices that are the same, per block (heads | MLP channels | both).",
        "",
        "| Taylor | ratio, layers | alignment | params prunekit | params LLM-Pruner | ppl prunekit | ppl LLM-Pruner "
        "(our run) | published | prunekit vs LLM-Pruner | agreement per block: heads | channels | all |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        blocks = sorted({k.split(".")[0] for k in r["agreement"]})

        def per(kind, r=r, blocks=blocks):
            return " ".join(
                f"{r['agreement'][f'{b}.{kind}']:.3f}" if f"{b}.{kind}" in r["agreement"] else "–" for b in blocks
            )

        published = f"{r['published_ppl']:.3f}" if r["published_ppl"] else "–"
        lines.append(
            f"| {r['taylor']} | {r['ratio']}, {r['layers'][0]}–{r['layers'][1]} | {r['alignment']} | "
            f"{r['params_after']:,} | {r['reference_params_after']:,} | {r['ppl']:.3f} | {r['reference_ppl']:.3f} | "
            f"{published} | {100 * r['ppl_vs_reference']:+.2f}% | {per('heads')} | {per('channels')} | {per('all')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    fixtures = Path(args.fixtures)
    reference = json.loads(Path(args.reference).read_text())
    tok = AutoTokenizer.from_pretrained(fixtures / "kjv-llama-5m")
    dense = AutoModelForCausalLM.from_pretrained(fixtures / "kjv-llama-5m").eval()
    cal = reference["calibration"]
    batches = calibration_batches(str(fixtures / "kjv" / "train.txt"), tok, cal["nsamples"], cal["seqlen"], cal["seed"])
    test = tokenize(tok, load_text(fixtures / "kjv" / "test.txt"))
    result = {"model": "kjv-llama-5m", "dense_ppl": perplexity(dense, test, 256), "versions": versions(), "rows": []}
    result["reference"] = {k: v for k, v in reference.items() if k != "runs"}
    cache: dict[str, float] = {}
    for run in reference["runs"]:
        alignments = args.alignments if run["taylor"] == "param_first" else ["strided"]
        for alignment in alignments:
            result["rows"].append(run_row(dense, run, alignment, batches, test, cache))
            write_json(Path(args.out).with_suffix(".json"), result)
    Path(args.out).with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
