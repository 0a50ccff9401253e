"""Pruning with fine-tuning, measured on the fixtures.

LLM (kjv-llama-5m): Wanda 70% one-shot with the published protocol (128 x 256-token windows of
kjv/train.txt, seed 0, per-output, block by block), then the same short fine-tune on kjv/train.txt three
ways: LoRA adapters merged back with the masks re-applied (trained with a dense delta, and with the delta
masked in every forward pass), full fine-tuning with the masks held by
PruningCallback, and the dense model fine-tuned alike (to separate recovery from "more training").
Perplexity on kjv/test.txt, non-overlapping 256-token windows (METRICS.md).

Vision (convnext-digits, 80%, every Linear / 1x1 conv in the stages, stem and head dense, per layer): the
same number of fine-tuning steps after one-shot pruning, with gradual (cubic) pruning by PruningCallback,
and with Lightning's own ModelPruning (l1_unstructured, per layer, one-shot / epoch-wise cubic). Top-1 and
cross-entropy on digits/val (450 images), and whether the model's state dict keeps its original keys
during training and at the end.

    python benchmarks/finetune.py [--part llm|vision|all] [--threads 2] [--vision-sparsity 0.8 0.9]
Writes benchmarks/results/finetune.{json,md} (a part run alone replaces only its own rows).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelPruning

import prunekit
from prunekit.api import layer_sparsity
from prunekit.data import load_text, tokenize
from prunekit.data.images import image_calibration
from prunekit.eval import perplexity
from prunekit.eval.image import ImageClassifier, ImageDataModule, evaluate_image
from prunekit.finetune import CausalLMModule, TextDataModule, add_lora, keep_masks, merge_lora_keep_sparsity
from prunekit.io import load_causal_lm, load_tokenizer, write_json
from prunekit.io.timm import load_vision_model
from prunekit.lightning import PruningCallback
from prunekit.schedule import cubic_sparsity

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
RESULTS = ROOT / "benchmarks" / "results"
LLM = dict(
    model=FIXTURES / "kjv-llama-5m",
    train=FIXTURES / "kjv" / "train.txt",
    test=FIXTURES / "kjv" / "test.txt",
    sparsity=0.7,
    steps=150,
    batch=4,
    seqlen=256,
    lora=dict(r=16, alpha=32),
    lora_lr=1e-3,
    full_lr=3e-4,
    warmup=15,
)
VISION = dict(
    model=f"local-dir:{FIXTURES / 'convnext-digits'}",
    train=FIXTURES / "digits" / "train",
    val=FIXTURES / "digits" / "val",
    sparsity=0.8,
    epochs=8,
    batch=32,
    lr=2e-4,
    weight_decay=0.05,
    end_epoch=5,
    every=24,
    calib_batches=4,
)


def trainer(steps: int, callbacks: list, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
        **kwargs,
    )


# ---------------------------------------------------------------- LLM


def llm_part() -> dict[str, Any]:
    tok = load_tokenizer(LLM["model"])
    test = tokenize(tok, load_text(LLM["test"]))
    data = TextDataModule(tok, LLM["train"], seqlen=LLM["seqlen"], batch_size=LLM["batch"], seed=0)
    ppl = lambda m: perplexity(m, test, LLM["seqlen"], batch_size=8)  # noqa: E731
    dense = load_causal_lm(LLM["model"])
    rows = [{"run": "dense", "steps": 0, "ppl": ppl(dense), "sparsity": 0.0}]
    pruned = load_causal_lm(LLM["model"])
    report = prunekit.prune(
        pruned, "wanda", LLM["sparsity"], calib=str(LLM["train"]), tokenizer=tok, nsamples=128, seqlen=256, seed=0
    )
    masks = keep_masks(pruned, names=report.layers)
    rows.append({"run": "Wanda 70% one-shot", "steps": 0, "ppl": ppl(pruned), "sparsity": report.sparsity})
    rows += llm_lora(copy.deepcopy(pruned), masks, data, ppl, masked=False)
    rows += llm_lora(copy.deepcopy(pruned), masks, data, ppl, masked=True)
    rows.append(llm_full(copy.deepcopy(pruned), masks, data, ppl, "Wanda 70% + full fine-tune (masks held)"))
    rows.append(llm_full(dense, None, data, ppl, "dense + full fine-tune (control)"))
    return {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in LLM.items()}, "rows": rows}


def llm_lora(model, masks, data, ppl, masked: bool) -> list[dict]:
    keys = list(model.state_dict())
    L.seed_everything(0, verbose=False)  # the adapters' random init
    adapted = add_lora(model, **LLM["lora"], masks=masks if masked else None)
    name = "Wanda 70% + LoRA, masked delta (dW*M)" if masked else "Wanda 70% + LoRA, dense delta"
    module = CausalLMModule(adapted.train(), lr=LLM["lora_lr"], warmup_steps=LLM["warmup"])
    start = time.perf_counter()
    trainer(LLM["steps"], []).fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    unmerged = ppl(adapted)
    merged = merge_lora_keep_sparsity(adapted, masks)
    layers = dict(merged.named_modules())
    same_zeros = all(torch.equal(layers[n].weight != 0, m) for n, m in masks.items())
    return [
        {"run": f"{name}, adapters unmerged", "steps": LLM["steps"], "ppl": unmerged, "train_s": seconds},
        {
            "run": f"{name}, merged + masks re-applied",
            "steps": LLM["steps"],
            "ppl": ppl(merged),
            "sparsity": layer_sparsity({n: layers[n] for n in masks})[1],
            "zeros_identical_to_base": same_zeros,
            "state_dict_keys_unchanged": list(merged.state_dict()) == keys,
        },
    ]


def llm_full(model, masks, data, ppl, name: str) -> dict:
    keys = list(model.state_dict())
    callbacks = [PruningCallback(schedule="fixed")] if masks is not None else []
    module = CausalLMModule(model.train(), lr=LLM["full_lr"], warmup_steps=LLM["warmup"])
    start = time.perf_counter()
    trainer(LLM["steps"], callbacks).fit(module, datamodule=data)
    row = {
        "run": name,
        "steps": LLM["steps"],
        "ppl": ppl(model),
        "train_s": time.perf_counter() - start,
        "state_dict_keys_unchanged": list(model.state_dict()) == keys,
    }
    if masks is not None:
        layers = dict(model.named_modules())
        row["sparsity"] = layer_sparsity({n: layers[n] for n in masks})[1]
        row["zeros_identical_to_base"] = all(torch.equal(layers[n].weight != 0, m) for n, m in masks.items())
    return row


# ---------------------------------------------------------------- vision


class KeySpy(L.Callback):
    """Records the model's state-dict keys half way through training (ModelPruning adds weight_orig/mask)."""

    def __init__(self, step: int):
        self.step, self.keys = step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.keys = list(pl_module.model.state_dict())


def vision_run(name: str, callbacks_for, prune_first: str | None = None) -> dict:
    """Fine-tune a fresh convnext-digits for the benchmark's steps with ``callbacks_for(module)``."""
    L.seed_everything(0, verbose=False)
    model = load_vision_model(VISION["model"])
    keys, steps = list(model.state_dict()), VISION["epochs"] * steps_per_epoch(model)
    if prune_first:
        calib = image_calibration(model, VISION["train"], nsamples=128, batch_size=32, seed=0)
        prunekit.prune(model, prune_first, VISION["sparsity"], group="per-layer", calib=calib)
    module = ImageClassifier(model, lr=VISION["lr"], weight_decay=VISION["weight_decay"])
    spy = KeySpy(steps // 2)
    start = time.perf_counter()
    trainer(steps, callbacks_for(module) + [spy]).fit(module, datamodule=vision_data(model))
    seconds = time.perf_counter() - start
    result = evaluate_image(model.eval(), VISION["val"], batch_size=150, progress=False)
    return {
        "run": name,
        "steps": steps,
        "top1": result["top1"],
        "loss": result["loss"],
        "sparsity": layer_sparsity(prunekit.select_layers(model))[1],
        "train_s": seconds,
        "keys_mid_training": compare_keys(keys, spy.keys),
        "keys_final": compare_keys(keys, list(model.state_dict())),
    }


def compare_keys(original: list[str], now: list[str] | None) -> str:
    """'identical', 'same keys, reordered', or which keys were added / removed."""
    if now is None:
        return "not reached"
    if now == original:
        return "identical"
    if set(now) == set(original):
        return "same keys, reordered"
    added = sorted({k.rsplit(".", 1)[-1] for k in set(now) - set(original)})
    removed = sorted({k.rsplit(".", 1)[-1] for k in set(original) - set(now)})
    return f"+{'/'.join(added)} -{'/'.join(removed)}"


def vision_data(model) -> ImageDataModule:
    return ImageDataModule.for_model(model, train=VISION["train"], batch_size=VISION["batch"], train_augment=False)


def steps_per_epoch(model) -> int:
    data = vision_data(model)
    data.setup("fit")
    return math.ceil(len(data.train_set) / VISION["batch"])


def ours(method: str, schedule: str, end_step: int):
    return lambda module: [
        PruningCallback(
            method,
            VISION["sparsity"],
            group="per-layer",
            schedule=schedule,
            end_step=end_step,
            every_n_steps=VISION["every"],
            calib_batches=VISION["calib_batches"],
        )
    ]


def lightning_pruning(amount):
    """ModelPruning on the same layers; ``amount(epoch)`` is the fraction of the *remaining* weights."""

    def make(module):
        params = [(m, "weight") for m in prunekit.select_layers(module.model).values()]
        return [ModelPruning("l1_unstructured", parameters_to_prune=params, amount=amount, verbose=0)]

    return make


def epochwise_cubic(final: float, epochs: int, per_epoch: int):
    """Cubic schedule sampled at epoch ends (ModelPruning prunes there), as relative amounts."""
    cumulative = [cubic_sparsity((e + 1) * per_epoch, final, 0.0, 0, epochs * per_epoch) for e in range(epochs)]
    relative = [1 - (1 - s) / (1 - p) for p, s in zip([0.0] + cumulative[:-1], cumulative)]
    return lambda epoch: relative[epoch] if epoch < epochs else 0.0


def vision_part(sparsity: float) -> dict[str, Any]:
    VISION["sparsity"] = sparsity
    model = load_vision_model(VISION["model"])
    per_epoch, s, pct = steps_per_epoch(model), sparsity, f"{100 * sparsity:.0f}%"
    end = VISION["end_epoch"] * per_epoch
    dense = evaluate_image(model, VISION["val"], batch_size=150, progress=False)
    rows = [{"run": "dense, no fine-tuning", "steps": 0, "top1": dense["top1"], "loss": dense["loss"], "sparsity": 0.0}]
    calib = image_calibration(model, VISION["train"], nsamples=128, batch_size=32, seed=0)
    prunekit.prune(model, "wanda", s, group="per-layer", calib=calib)
    oneshot = evaluate_image(model, VISION["val"], batch_size=150, progress=False)
    rows.append(
        {
            "run": f"Wanda {pct} one-shot, no fine-tuning",
            "steps": 0,
            "top1": oneshot["top1"],
            "loss": oneshot["loss"],
            "sparsity": layer_sparsity(prunekit.select_layers(model))[1],
        }
    )
    rows += [
        vision_run("dense fine-tune (control)", lambda m: []),
        vision_run(
            f"Wanda {pct} one-shot, then fine-tune (PruningCallback fixed)",
            lambda m: [PruningCallback(schedule="fixed")],
            prune_first="wanda",
        ),
        vision_run(f"Wanda {pct} gradual cubic (PruningCallback)", ours("wanda", "cubic", end)),
        vision_run(f"magnitude {pct} gradual cubic (PruningCallback)", ours("magnitude", "cubic", end)),
        vision_run(f"magnitude {pct} one-shot at fit start (PruningCallback)", ours("magnitude", "oneshot", None)),
        vision_run(
            f"ModelPruning l1_unstructured {pct}, epoch-wise cubic",
            lightning_pruning(epochwise_cubic(s, VISION["end_epoch"], per_epoch)),
        ),
        vision_run(
            f"ModelPruning l1_unstructured {pct} at end of epoch 0",
            lightning_pruning(lambda epoch: s if epoch == 0 else 0.0),
        ),
    ]
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in VISION.items()}
    return {"settings": {**settings, "steps_per_epoch": per_epoch, "end_step": end}, "rows": rows}


# ---------------------------------------------------------------- output


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Pruning with fine-tuning", "", f"Threads: {results.get('threads')}; CPU only.", ""]
    if "llm" in results:
        s = results["llm"]["settings"]
        lines += [
            f"## kjv-llama-5m: Wanda 70% one-shot, then {s['steps']} steps (batch {s['batch']} x "
            f"{s['seqlen']} tokens of kjv/train.txt; LoRA r {s['lora']['r']}, alpha {s['lora']['alpha']}, lr "
            f"{s['lora_lr']}; full fine-tune lr {s['full_lr']}; {s['warmup']} warm-up steps, cosine)",
            "",
            "| run | steps | test ppl | sparsity | zeros = base | keys unchanged | train s |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['run']} | {r['steps']} | {r['ppl']:.2f} | {_fmt(r.get('sparsity'))} | "
            f"{_fmt(r.get('zeros_identical_to_base'))} | {_fmt(r.get('state_dict_keys_unchanged'))} | "
            f"{_fmt(r.get('train_s'), '.0f')} |"
            for r in results["llm"]["rows"]
        ]
        lines.append("")
    for key in sorted(k for k in results if k.startswith("vision")):
        s = results[key]["settings"]
        lines += [
            f"## convnext-digits at {100 * s['sparsity']:.0f}%: {s['epochs']} epochs x {s['steps_per_epoch']} steps "
            f"(batch {s['batch']}, "
            f"AdamW lr {s['lr']}, wd {s['weight_decay']}); gradual schedules reach {100 * s['sparsity']:.0f}% at step "
            f"{s['end_step']}",
            "",
            "| run | steps | top-1 | loss | sparsity | state-dict keys mid-training | final state-dict keys "
            "| train s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['run']} | {r['steps']} | {r['top1']:.4f} | {r['loss']:.3f} | {_fmt(r.get('sparsity'))} | "
            f"{r.get('keys_mid_training', '–')} | {r.get('keys_final', '–')} | "
            f"{_fmt(r.get('train_s'), '.0f')} |"
            for r in results[key]["rows"]
        ]
        lines.append("")
    return "\n".join(lines) + "\n"


def _fmt(value, spec: str = ".4f") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("llm", "vision", "all"), default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vision-sparsity", type=float, nargs="+", default=[0.8])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    path = args.out / "finetune.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["threads"] = args.threads
    parts = [("llm", llm_part)] + [(f"vision@{s}", lambda s=s: vision_part(s)) for s in args.vision_sparsity]
    for key, run in parts:
        if args.part in (key.split("@")[0], "all"):
            start = time.perf_counter()
            results[key] = {**run(), "wall_s": time.perf_counter() - start}
            write_json(path, results)
    (args.out / "finetune.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
