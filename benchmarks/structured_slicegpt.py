"""SliceGPT on an RMSNorm and a LayerNorm model side by side: kjv-llama-5m (LlamaForCausalLM) and kjv-opt-2m
(OPTForCausalLM, ``tests/assets``, made by ``benchmarks/make_kjv_opt.py``), each sliced at the paper's slicing
fractions of the hidden width and at 25% of the decoder-layer parameters.

Protocol (../shared/fixtures/METRICS.md): calibration = 128 windows x 256 tokens of kjv/train.txt (seed 0);
perplexity = kjv/test.txt in non-overlapping 256-token windows. Every sliced model is saved and loaded back
(``prunekit.load``: ``from_pretrained`` for the LLaMA, prunekit's loader for the OPT, whose attention width is its
``hidden_size``) and must give identical logits before it is measured. Quality only, no timings: the numbers do not
depend on the machine's load. Writes the ``slicegpt_norms`` section of benchmarks/results/structured.{json,md}
(``benchmarks/structured.py`` keeps it when it rewrites the rest); ``--models`` remeasures some models and keeps the
other models' rows.

    python benchmarks/structured_slicegpt.py [--models kjv-opt-2m]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import prunekit
from prunekit.data import calibration_batches, load_text, random_windows, tokenize
from prunekit.eval import perplexity
from prunekit.io import write_json
from prunekit.structured import STRUCTURED

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from structured import markdown, norms_markdown, write_results  # noqa: E402

MODELS = {
    "kjv-llama-5m": ROOT / "prunekit" / "assets" / "kjv-llama-5m",
    "kjv-opt-2m": ROOT / "tests" / "assets" / "kjv-opt-2m",
}
# (slicing, fraction): the paper's slicings of the hidden width, and prunekit's default reading at 25% and at 12.5%
# (as many parameters left as the published code's 0.25 leaves on kjv-llama-5m).
SETTINGS = [("width", 0.10), ("width", 0.25), ("width", 0.30), ("params", 0.25), ("params", 0.125)]
# microsoft/TransformerCompression's run_slicegpt.py on kjv-llama-5m (../shared/fixtures/METRICS.md): slicing ->
# (parameters after, counting its shortcut matrices; perplexity).
PUBLISHED = {0.10: (4_934_144, 46.66), 0.25: (4_361_216, 46.71), 0.30: (4_080_128, 46.76)}
# prunekit's rows set beside a published cell: the same slicing of the width, or the same size.
COMPARED = {("width", 0.10): 0.10, ("width", 0.25): 0.25, ("width", 0.30): 0.30, ("params", 0.125): 0.25}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", default=str(ROOT / "prunekit" / "assets" / "kjv"), help="folder with train/test.txt")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--test-tokens", type=int, default=None, help="evaluate on the first N test tokens (a quick check)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "structured"))
    return p.parse_args()


def reloaded(model, tokens: torch.Tensor):
    """Save and load back the way a user would (``prunekit.load``); the logits must be identical."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded = prunekit.load(tmp)
    with torch.no_grad():
        if not torch.equal(loaded(tokens).logits, model(tokens).logits):
            raise RuntimeError("the reloaded checkpoint does not reproduce the sliced model")
    return loaded


def run_model(name: str, args, train: torch.Tensor, test: torch.Tensor) -> list[dict]:
    dense = AutoModelForCausalLM.from_pretrained(MODELS[name], dtype=torch.float32).eval()
    batches = calibration_batches(random_windows(train, args.nsamples, args.seqlen, 0), batch_size=8)
    dense_ppl = perplexity(dense, test, 256, batch_size=8)
    logging.info("%s: dense perplexity %.2f", name, dense_ppl)
    rows = []
    for slicing, ratio in SETTINGS:
        model = copy.deepcopy(dense)
        summary = STRUCTURED.create("slicegpt", {"slicing": slicing}).prune_model(model, batches, ratio)
        model = reloaded(model, test[None, :256])
        row = {"model": name, "slicing": slicing, "ratio": ratio, "dense_ppl": dense_ppl}
        row |= {k: v for k, v in summary.items() if k != "config"} | {"ppl": perplexity(model, test, 256, 8)}
        if name == "kjv-llama-5m" and (slicing, ratio) in COMPARED:
            published = COMPARED[(slicing, ratio)]
            row["published"] = dict(zip(("slicing", "params", "ppl"), (published, *PUBLISHED[published])))
        logging.info("%s %s %.0f%%: ppl %.2f, hidden %d", name, slicing, 100 * ratio, row["ppl"], row["hidden_after"])
        rows.append(row)
    return rows


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)  # a shared 2-core machine: two threads wait on each other
    tokenizer = AutoTokenizer.from_pretrained(MODELS["kjv-llama-5m"])  # both models share it
    text = Path(args.text)
    train, test = (tokenize(tokenizer, load_text(text / f"{split}.txt")) for split in ("train", "test"))
    test = test[: args.test_tokens] if args.test_tokens else test
    out = Path(args.out)
    saved = out.with_suffix(".json")
    result = json.loads(saved.read_text()) if saved.is_file() else {}
    section = {"nsamples": args.nsamples, "seqlen": args.seqlen, "rows": []}
    earlier = result.get("slicegpt_norms", {})
    if all(earlier.get(k) == section[k] for k in ("nsamples", "seqlen")):  # same protocol: other models' rows stay
        section["rows"] = [r for r in earlier["rows"] if r["model"] not in args.models]
    section["rows"] += [row for name in args.models for row in run_model(name, args, train, test)]
    section["rows"].sort(key=lambda r: list(MODELS).index(r["model"]))
    result["slicegpt_norms"] = section
    if "rows" in result:  # structured.py's results: rewrite both files with the new section
        write_results(result, out)
        print(markdown(result))
    else:  # a quick check into a fresh --out
        write_json(saved, result)
        out.with_suffix(".md").write_text(norms_markdown(result["slicegpt_norms"]))
        print(norms_markdown(result["slicegpt_norms"]))


if __name__ == "__main__":
    main()
