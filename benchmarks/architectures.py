"""Pruning quality on a Gemma-3-shaped and a Mixtral-shaped model trained briefly on the KJV fixture.

Both are small (hidden 128, 4 blocks; Gemma 3: sliding-window and full-attention blocks alternating; Mixtral:
4 experts, 2 routed per token), trained by a seeded loop on kjv/train.txt with the bundled tokenizer and cached
under benchmarks/.cache/ (a rerun only prunes). For each: perplexity on kjv/test.txt dense and after Wanda 50%,
SparseGPT 50%, Wanda 2:4 and Wanda 70% (calibration: 64 x 128 tokens of kjv/train.txt). For the Gemma-3 model,
Wanda 50% and 70% are also run the way prunekit did before per-block capture (every block calibrated with block
0's attention mask and rotary tables), reproduced here only, so the gain from exact calibration is measured in the
same run.
Writes benchmarks/results/architectures.{json,md}.

    python benchmarks/architectures.py [--steps 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

import prunekit
from prunekit import engine
from prunekit.cli import demo_assets
from prunekit.coverage import block_coverage
from prunekit.data import load_text, random_windows, tokenize
from prunekit.eval import perplexity

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache" / "architectures"
RESULTS = ROOT / "benchmarks" / "results"
SEQLEN = 128
COMMON = dict(
    vocab_size=4096,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)


def configs():
    from transformers import Gemma3TextConfig, MixtralConfig

    return {
        "gemma3": Gemma3TextConfig(**COMMON, head_dim=32, sliding_window=32, sliding_window_pattern=2),
        "mixtral": MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    }


def train(name: str, config, tokens: torch.Tensor, steps: int, seed: int = 0):
    """A seeded AdamW loop on random KJV windows; the result is saved and reused."""
    from transformers import AutoModelForCausalLM

    path = CACHE / f"{name}-{steps}"
    if (path / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(path).eval(), json.loads((path / "train.json").read_text())
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, tokens.numel() - SEQLEN - 1, (16,), generator=generator)
        batch = torch.stack([tokens[s : s + SEQLEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if step % 100 == 0:
            print(f"{name} step {step}: loss {loss.item():.3f}", flush=True)
    info = {"steps": steps, "final_loss": float(loss), "train_s": time.perf_counter() - start}
    model.eval().save_pretrained(path)
    (path / "train.json").write_text(json.dumps(info))
    return model, info


@contextmanager
def block_zero_arguments():
    """prunekit before per-block capture: every block gets block 0's keyword arguments."""
    original = engine.own_calls
    engine.own_calls = lambda calls: []
    try:
        yield
    finally:
        engine.own_calls = original


RUNS = [
    ("wanda 50%", dict(method="wanda", sparsity=0.5)),
    ("sparsegpt 50%", dict(method="sparsegpt", sparsity=0.5)),
    ("wanda 2:4", dict(method="wanda", sparsity=0.5, pattern="2:4")),
    ("wanda 70%", dict(method="wanda", sparsity=0.7)),
]
# Gemma 3 only: the same Wanda runs calibrated the way prunekit did before per-block capture.
BLOCK_ZERO = [
    ("wanda 50%, block 0's arguments", dict(method="wanda", sparsity=0.5)),
    ("wanda 70%, block 0's arguments", dict(method="wanda", sparsity=0.7)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--test-tokens", type=int, default=60000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_assets() / "kjv-llama-5m")
    train_tokens = tokenize(tok, load_text(demo_assets() / "kjv" / "train.txt"))
    test = tokenize(tok, load_text(demo_assets() / "kjv" / "test.txt"))[: args.test_tokens]
    calib = random_windows(train_tokens, 64, SEQLEN, seed=0)
    results = {"seqlen": SEQLEN, "calibration": "64 x 128 tokens of kjv/train.txt", "models": {}}
    for name, config in configs().items():
        dense, info = train(name, config, train_tokens, args.steps)
        row = {"train": info, "dense": perplexity(dense, test, SEQLEN)}
        print(f"{name}: dense ppl {row['dense']:.3f}", flush=True)
        variants = RUNS + (BLOCK_ZERO if name == "gemma3" else [])
        for label, settings in variants:
            model = copy.deepcopy(dense)
            context = block_zero_arguments() if "block 0" in label else nullcontext()
            start = time.perf_counter()
            with context:
                report = prunekit.prune(model, calib=calib, batch_size=8, **settings)
            coverage = block_coverage(model, prunekit.plan_prune(model, settings["method"]).layers)
            row[label] = {
                "ppl": perplexity(model, test, SEQLEN),
                "sparsity": report.sparsity,
                "block_sparsity": coverage.get("block_sparsity"),
                "prune_s": time.perf_counter() - start,
            }
            print(f"{name}: {label}: {row[label]}", flush=True)
        results["models"][name] = row
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "architectures.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "architectures.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = [
        "# Pruning beyond LLaMA: Gemma-3- and Mixtral-shaped models trained on KJV",
        "",
        f"Perplexity on kjv/test.txt ({results['seqlen']}-token windows); calibration {results['calibration']}. "
        "Block sparsity: zeros among every weight matrix inside the decoder blocks (experts included).",
        "",
        "| model | run | ppl | sparsity | block sparsity | prune s |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results["models"].items():
        lines.append(f"| {name} | dense ({row['train']['steps']} steps) | {row['dense']:.3f} | 0 | 0 | |")
        for label, cell in row.items():
            if isinstance(cell, dict) and "ppl" in cell:
                lines.append(
                    f"| {name} | {label} | {cell['ppl']:.3f} | {cell['sparsity']:.3f} | "
                    f"{cell['block_sparsity']:.3f} | {cell['prune_s']:.1f} |"
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
