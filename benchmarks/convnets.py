"""ResNet-18 on the digits fixture: top-1 after magnitude / Wanda / SparseGPT pruning, with and without
BatchNorm recalibration.

A torchvision ``resnet18`` (10 classes; a 3x3 stride-1 stem for 32x32 inputs, max-pool kept, so the
four stages run at 16/8/4/2 pixels) is trained from a fixed seed on ``digits/train`` and cached under
``benchmarks/.cache/``. Every conv in ``layer1``-``layer4`` is pruned (``include=["layer*"]``: stem
and classifier dense) with each method x comparison group x {50%, 70%, 2:4}; the same calibration
images (``--calib-images`` from ``digits/train``, seed 0) feed the pruning statistics and the
recalibration. Top-1 on ``digits/val`` before and after ``prunekit.bn.recalibrate_bn``.

    python benchmarks/convnets.py                  # all methods: SparseGPT's conv Hessians dominate
    python benchmarks/convnets.py --methods magnitude wanda

Measured on 2 shared CPU cores (load 12-18): training 8 epochs 52 min (once; cached), then per setting
~1 min (magnitude), ~2.5 min (Wanda), ~7 min (SparseGPT) including two evaluations and a recalibration.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import prunekit
from prunekit.api import versions
from prunekit.bn import needs_bn_recalibration, recalibrate_bn
from prunekit.data.images import image_calibration, image_dataset, image_transform
from prunekit.eval.image import evaluate_image
from prunekit.io import write_json

HERE = Path(__file__).resolve().parent
DIGITS = (HERE.parent / ".." / "shared" / "fixtures" / "digits").resolve()
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
# The preprocessing the model is trained with; prunekit's image helpers read it from ``pretrained_cfg``.
DATA_CFG = {
    "input_size": (3, 32, 32),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "crop_mode": "center",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
}
GROUPS = ("per-layer", "per-output")
SPARSITIES = (0.5, 0.7)
INCLUDE = ["layer*"]

log = logging.getLogger("convnets")


def build_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision resnet18 with a 3x3 stride-1 stem: 32x32 digits keep 16x16 maps into layer1."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.pretrained_cfg = dict(DATA_CFG)
    return model


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a digits split as one normalised tensor ``[N, 3, 32, 32]`` and their labels."""
    dataset = image_dataset(DIGITS / split, image_transform(DATA_CFG))
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels)


def random_shift(images: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Translate each image by up to ``pad`` pixels (padding with the background value)."""
    padded = F.pad(images, [pad] * 4, value=float(images.min()))
    offsets = torch.randint(0, 2 * pad + 1, (images.shape[0], 2), generator=gen).tolist()
    size = images.shape[-1]
    return torch.stack([p[:, i : i + size, j : j + size] for p, (i, j) in zip(padded, offsets)])


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 0.05,
) -> None:
    """SGD with momentum and a cosine schedule; seeded order and augmentation."""
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(images) // batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for epoch in range(epochs):
        start, total = time.perf_counter(), 0.0
        for idx in torch.randperm(len(images), generator=gen).split(batch_size):
            loss = F.cross_entropy(model(random_shift(images[idx], gen)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log.info("epoch %d/%d: loss %.4f (%.0fs)", epoch + 1, epochs, total / len(images), time.perf_counter() - start)
    model.eval()


def trained_model(epochs: int, seed: int) -> nn.Module:
    """The trained dense model, from the cache when this (epochs, seed) was trained before."""
    path = CACHE / f"resnet18-digits-e{epochs}-s{seed}.pt"
    torch.manual_seed(seed)
    model = build_resnet18()
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        log.info("loaded the trained model from %s", path)
        return model.eval()
    images, labels = load_split("train")
    train(model, images, labels, epochs, seed)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def evaluate(model: nn.Module) -> dict[str, float]:
    result = evaluate_image(model, DIGITS / "val", batch_size=150, progress=False)
    return {"top1": result["top1"], "loss": result["loss"], "images": result["images"]}


def settings(methods: list[str]) -> list[dict[str, Any]]:
    """Every method x group x sparsity, plus 2:4 once per method (N:M fixes the comparison group)."""
    rows = [dict(method=m, group=g, sparsity=s, pattern=None) for m in methods for g in GROUPS for s in SPARSITIES]
    return rows + [dict(method=m, group=None, sparsity=0.5, pattern="2:4") for m in methods]


def run_setting(
    model: nn.Module, dense_state: dict, setting: dict[str, Any], calib: list[torch.Tensor]
) -> dict[str, Any]:
    """Prune a fresh copy of the dense weights, evaluate, recalibrate BatchNorm, evaluate again."""
    model.load_state_dict(dense_state)
    report = prunekit.prune(
        model,
        setting["method"],
        setting["sparsity"],
        pattern=setting["pattern"],
        group=setting["group"],
        calib=calib,
        include=INCLUDE,
        recalibrate_bn=False,
    )
    row = {
        **setting,
        "group": report.settings["group"],
        "measured_sparsity": report.sparsity,
        "prune_s": report.timings["total_s"],
        "layers": len(report.layers),
    }
    row["needs_recalibration"] = needs_bn_recalibration(model, report.layers, example=calib[0])
    row["no_bn"] = evaluate(model)
    start = time.perf_counter()
    recalibrate_bn(model, calib)
    row["recalibrate_s"] = time.perf_counter() - start
    row["bn"] = evaluate(model)
    log.info(
        "%s %s %s: top-1 %.4f -> %.4f with BN recalibration",
        setting["method"],
        row["group"],
        setting["pattern"] or f"{setting['sparsity']:.0%}",
        row["no_bn"]["top1"],
        row["bn"]["top1"],
    )
    return row


def label(row: dict[str, Any]) -> str:
    return row["pattern"] or f"{row['sparsity']:.0%}"


def markdown(result: dict[str, Any]) -> str:
    """The results table: top-1 / cross-entropy without and with BatchNorm recalibration."""
    dense = result["dense"]
    lines = [
        f"Dense top-1 **{dense['top1']:.4f}** (loss {dense['loss']:.3f}) on digits/val "
        f"({result['config']['val_images']} images); {result['config']['calib_images']} calibration images; "
        f"pruned: every conv in layer1-layer4 ({result['rows'][0]['layers']} layers).",
        "",
        "| method | group | sparsity | top-1 | top-1 + BN recal | loss | loss + BN recal | prune s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        group = "n/a (N:M)" if r["pattern"] else r["group"]
        lines.append(
            f"| {r['method']} | {group} | {label(r)} | {r['no_bn']['top1']:.4f} | {r['bn']['top1']:.4f} | "
            f"{r['no_bn']['loss']:.3f} | {r['bn']['loss']:.3f} | {r['prune_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="registered methods to run (default: magnitude, wanda and sparsegpt when registered)",
    )
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-images", type=int, default=512)
    p.add_argument("--out", type=Path, default=RESULTS / "convnets")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("lightning", "lightning.pytorch", "prunekit.engine"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(2)
    methods = args.methods or [m for m in ("magnitude", "wanda", "sparsegpt") if m in prunekit.METHODS]
    model = trained_model(args.epochs, args.seed)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = image_calibration(model, DIGITS / "train", nsamples=args.calib_images, batch_size=64, seed=args.seed)
    dense = evaluate(model)
    log.info("dense top-1 %.4f", dense["top1"])
    rows = [run_setting(model, dense_state, s, calib) for s in settings(methods)]
    config = {
        "model": "torchvision resnet18, 3x3 stride-1 stem",
        "epochs": args.epochs,
        "seed": args.seed,
        "calib_images": args.calib_images,
        "include": INCLUDE,
        "val_images": dense["images"],
        "threads": 2,
    }
    result = {"config": config, "dense": dense, "rows": rows, "versions": versions()}
    write_json(args.out.with_suffix(".json"), result)
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
