"""A CLIP-architecture dual encoder trained on the digits with captions, then pruned through prunekit's command path.

1. Train (seeded, CPU): a ``transformers.CLIPModel`` (ViT image tower on 32x32 images in 4x4 patches, text tower on
   the bundled KJV tokenizer) on the fixture's ``digits/train`` (1,347 images), each captioned by
   ``make_digits_captions.captions`` (five templates, digit as numeral or word). The loss is CLIP's symmetric
   cross-entropy over the batch's image-caption similarities, except that every caption of an image's class counts
   as a match (a batch holds many images of one class: their captions are no negatives). Saved with its processor.
2. Prune with ``prunekit prune``'s own job (``commands.run_prune``): 128 calibration images of ``digits/train``
   captioned from their class names (``a photo of a {}.``); Wanda 50% (per-layer, the vision default), Wanda 2:4,
   SparseGPT 50%; every Linear inside both towers' blocks, embeddings, projections and patch stem dense.
3. Metrics, as ``prunekit eval model`` computes them: zero-shot top-1 / top-5 over the fixture's ``digits/val`` (450
   images; the ten class names in ``a photo of a {}.``) and image-text retrieval recall@1 / @5 on the val images with
   their captions.

Writes ``benchmarks/results/dual_encoder_digits.{json,md}`` and the trained model to ``out/benchmarks/clip-digits``.
Quality numbers only (no timing), so any machine will do; about 10 CPU minutes.

    python benchmarks/dual_encoder_digits.py [--fixtures ../shared/fixtures] [--epochs 40] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from make_digits_captions import captions  # noqa: E402

from prunekit.cli import demo_assets  # noqa: E402
from prunekit.commands import run_eval, run_prune  # noqa: E402
from prunekit.recipe import PruneRecipe  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TRAINING = "training.json"  # beside the trained model: its parameters and epochs
SEED, BATCH, LR, TEXT_TOKENS = 0, 128, 2e-3, 16
TOWER = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)
RUNS = {  # label -> prune settings
    "Wanda 50%": dict(method="wanda", sparsity=0.5),
    "Wanda 2:4": dict(method="wanda", pattern="2:4"),
    "SparseGPT 50%": dict(method="sparsegpt", sparsity=0.5),
}
CALIBRATION = dict(nsamples=128, batch_size=32, seed=0)


def processor() -> transformers.CLIPProcessor:
    """The KJV tokenizer (padding with its end-of-text token, where CLIP pools) and a 32x32 image processor."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo_assets() / "kjv-llama-5m")
    tokenizer.pad_token = tokenizer.eos_token
    square = {"height": 32, "width": 32}
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=square)
    return transformers.CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def model() -> transformers.CLIPModel:
    text = dict(TOWER, vocab_size=4096, max_position_embeddings=TEXT_TOKENS, bos_token_id=0, eos_token_id=1)
    vision = dict(TOWER, image_size=32, patch_size=4)
    return transformers.CLIPModel(
        transformers.CLIPConfig(text_config={**text, "pad_token_id": 1}, vision_config=vision)
    )


def encoded(proc, folder: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every image of a digits split with its caption, as model inputs, and the class of each."""
    from PIL import Image

    records = captions(folder)
    images = [Image.open(folder.parent / r["image"]).convert("RGB") for r in records]
    texts = [r["text"] for r in records]
    kwargs = dict(padding="max_length", max_length=TEXT_TOKENS, truncation=True, return_tensors="pt")
    inputs = proc(text=texts, images=images, **kwargs)
    return dict(inputs), torch.tensor([int(Path(r["image"]).parent.name) for r in records])


def class_matched_loss(out, labels: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over image-caption logits with every same-class pair a (shared) match."""
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(-1, keepdim=True)
    logits = out.logits_per_image
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def train(clip: transformers.CLIPModel, inputs: dict, labels: torch.Tensor, epochs: int) -> None:
    """AdamW with a one-cycle schedule, random shifts of up to 2 pixels."""
    opt = torch.optim.AdamW(clip.parameters(), lr=LR, weight_decay=0.05)
    steps = epochs * ((len(labels) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
    clip.train()
    for epoch in range(epochs):
        perm, total = torch.randperm(len(labels)), 0.0
        for start in range(0, len(labels), BATCH):
            j = perm[start : start + BATCH]
            shift = torch.randint(-2, 3, (2,))
            pixels = torch.roll(inputs["pixel_values"][j], shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
            out = clip(
                input_ids=inputs["input_ids"][j], attention_mask=inputs["attention_mask"][j], pixel_values=pixels
            )
            loss = class_matched_loss(out, labels[j])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(j)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(labels):.4f}", flush=True)
    clip.eval()


def captions_file(folder: Path, target: Path) -> Path:
    """A split's captions as an image-text data file in ``target`` (absolute image paths: the fixtures stay as
    they are)."""
    records = [{**r, "image": str(folder.parent / r["image"])} for r in captions(folder)]
    target.write_text("".join(json.dumps(r) + "\n" for r in records))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixtures", type=Path, default=ROOT.parent / "shared" / "fixtures")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "benchmarks" / "clip-digits")
    parser.add_argument("--reuse", action="store_true", help="evaluate and prune the model --out holds, untrained")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    digits = args.fixtures / "digits"
    if not args.reuse:
        trained(digits, args.out, args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        pairs = captions_file(digits / "val", Path(tmp) / "val-captions.jsonl")
        result = evaluate_all(args.out, digits, pairs, Path(tmp))
    result = {"model": json.loads((args.out / TRAINING).read_text()), **result}
    (RESULTS / "dual_encoder_digits.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "dual_encoder_digits.md").write_text(markdown(result))
    print(markdown(result))


def trained(digits: Path, out: Path, epochs: int) -> None:
    """Train the model on the captioned training split and save it with its processor and how it was trained."""
    proc, clip = processor(), model()
    train(clip, *encoded(proc, digits / "train"), epochs)
    clip.save_pretrained(out)
    proc.save_pretrained(out)
    params = sum(p.numel() for p in clip.parameters())
    (out / TRAINING).write_text(json.dumps({"parameters": params, "epochs": epochs}))


def evaluate_all(model_dir: Path, digits: Path, pairs: Path, tmp: Path) -> dict:
    """Zero-shot and retrieval of the dense model and of each pruned one (pruned by ``prunekit prune``'s job)."""
    runs = {"dense": metrics(model_dir, digits, pairs)}
    for label, settings in RUNS.items():
        out = tmp / label.replace(" ", "-").replace("%", "").replace(":", "of")
        recipe = PruneRecipe(
            model=str(model_dir), calib_data=str(digits / "train"), out=str(out), **CALIBRATION, **settings
        )
        report = run_prune(recipe)
        runs[label] = {"sparsity": report.sparsity, **metrics(out, digits, pairs)}
        print(label, runs[label], flush=True)
    return {"runs": runs}


def metrics(model_dir: Path, digits: Path, pairs: Path) -> dict[str, float]:
    zeroshot = run_eval(PruneRecipe(model=str(model_dir), eval_data=str(digits / "val"), eval_batch_size=150))
    retrieval = run_eval(PruneRecipe(model=str(model_dir), eval_data=str(pairs), eval_batch_size=150))
    keys = ("zeroshot_top1", "zeroshot_top5", "i2t_recall@1", "t2i_recall@1", "i2t_recall@5", "t2i_recall@5")
    return {k: {**zeroshot, **retrieval}[k] for k in keys}


def markdown(result: dict) -> str:
    runs = result["runs"]
    dense = runs["dense"]
    lines = [
        "# A CLIP-architecture dual encoder on the digits, pruned",
        "",
        f"`transformers.CLIPModel`, {result['model']['parameters']:,} parameters (both towers 4 blocks of width 64), "
        f"trained {result['model']['epochs']} epochs on the digits' 1,347 training images with captions "
        "(`benchmarks/dual_encoder_digits.py`). Zero-shot: the 450 validation images against `a photo of a {}.` for "
        "the ten class names; retrieval: the same images against their captions. Pruned by `prunekit prune` on 128 "
        "training images captioned from their class names; every Linear inside both towers' blocks, per-layer.",
        "",
        "| model | sparsity | zero-shot top-1 | kept | zero-shot top-5 | image→text R@1 | text→image R@1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, run in runs.items():
        kept = f"{run['zeroshot_top1'] / dense['zeroshot_top1']:.1%}"
        lines.append(
            f"| {label} | {run.get('sparsity', 0):.3f} | {run['zeroshot_top1']:.4f} | {kept} | "
            f"{run['zeroshot_top5']:.4f} | {run['i2t_recall@1']:.4f} | {run['t2i_recall@1']:.4f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
