"""Make the LayerNorm fixture: a small OPT-architecture causal LM trained on the KJV text, for SliceGPT's LayerNorm
path in benchmarks and slow tests (SliceGPT's paper ran OPT and Phi-2, both LayerNorm models).

``OPTForCausalLM``: hidden 128, 4 layers, 4 heads, ReLU MLP 512, pre-LayerNorm (``do_layer_norm_before``), learned
positions (256), untied head (like kjv-llama-5m), the bundled KJV tokenizer (4,096 tokens, that of kjv-llama-5m);
1.87M parameters, fp32. Trained on ``kjv/train.txt`` tokenised once as one string: STEPS steps of AdamW (cosine
schedule with warm-up) on BATCH random windows of SEQLEN tokens each. Then its dense perplexity on ``kjv/test.txt``
and ``kjv/validation.txt`` (the fixtures' protocol: tokenised once, non-overlapping 256-token windows) goes into
``training.json`` beside the checkpoint.

Seeded (torch seed 0, windows from their own generator, one thread, deterministic algorithms, CPU): a rerun gives
the same checkpoint up to CPU kernel differences. The committed one took 49 minutes on a 2-core machine shared with
other jobs (load 12-18; about 2.8 s a step when the load was lower): test perplexity 59.43, validation 58.38.

The checkpoint (7.5 MB) is committed under ``tests/assets/`` (outside the installed package: no user-facing quick
start needs it) so that slow tests and benchmarks find it on a fresh clone without retraining.

    python benchmarks/make_kjv_opt.py [--text prunekit/assets/kjv] [--out tests/assets/kjv-opt-2m]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

from prunekit.api import versions
from prunekit.data import load_text, tokenize
from prunekit.eval import perplexity

ROOT = Path(__file__).resolve().parents[1]
NAME = "kjv-opt-2m"
SIZES = dict(hidden_size=128, ffn_dim=512, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256)
STEPS, BATCH, SEQLEN, LR, WARMUP, WEIGHT_DECAY = 600, 16, 256, 2e-3, 40, 0.1
EVAL_SEQLEN = 256  # the fixtures' perplexity protocol


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", default=str(ROOT / "prunekit" / "assets" / "kjv"), help="folder with train/test.txt")
    p.add_argument("--validation", default=str(ROOT / ".." / "shared" / "fixtures" / "kjv" / "validation.txt"))
    p.add_argument("--tokenizer", default=str(ROOT / "prunekit" / "assets" / "kjv-llama-5m"))
    p.add_argument("--out", default=str(ROOT / "tests" / "assets" / NAME))
    p.add_argument("--steps", type=int, default=STEPS)
    return p.parse_args()


def build(tokenizer) -> OPTForCausalLM:
    config = OPTConfig(
        vocab_size=len(tokenizer),
        word_embed_proj_dim=SIZES["hidden_size"],
        do_layer_norm_before=True,
        dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        **SIZES,
    )
    torch.manual_seed(0)
    return OPTForCausalLM(config)


def learning_rate(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: OPTForCausalLM, tokens: torch.Tensor, steps: int) -> list[float]:
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95))
    windows = torch.Generator().manual_seed(0)
    losses, start = [], time.perf_counter()
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        starts = torch.randint(0, tokens.numel() - SEQLEN - 1, (BATCH,), generator=windows)
        batch = torch.stack([tokens[s : s + SEQLEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f}s", flush=True)
    return losses


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # on a shared 2-core machine two threads wait on each other: 2.8 s a step, not 7-16
    torch.use_deterministic_algorithms(True)
    text, out = Path(args.text), Path(args.out)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokens = tokenize(tokenizer, load_text(text / "train.txt"))
    model = build(tokenizer)
    start = time.perf_counter()
    losses = train(model, tokens, args.steps)
    seconds = time.perf_counter() - start
    model.eval()
    ppl = {"test": perplexity(model, tokenize(tokenizer, load_text(text / "test.txt")), EVAL_SEQLEN)}
    if Path(args.validation).is_file():
        ppl["validation"] = perplexity(model, tokenize(tokenizer, load_text(args.validation)), EVAL_SEQLEN)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "model": NAME,
        "params": sum(p.numel() for p in model.parameters()),
        "config": SIZES,
        "training": dict(steps=args.steps, batch=BATCH, seqlen=SEQLEN, lr=LR, warmup=WARMUP, weight_decay=WEIGHT_DECAY),
        "train_tokens": tokens.numel(),
        "loss_first_last": [losses[0], sum(losses[-20:]) / len(losses[-20:])],
        "dense_ppl": ppl,
        "eval": f"kjv/*.txt tokenised once, non-overlapping {EVAL_SEQLEN}-token windows",
        "train_seconds": seconds,
        "versions": versions(),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["dense_ppl"]), f"{record['params']} parameters, {seconds:.0f}s of training")


if __name__ == "__main__":
    main()
