"""Top-1 / cross-entropy of the digits vision fixtures pruned with magnitude and Wanda, per-layer vs
per-output, next to the reference table in ../shared/fixtures/METRICS.md; and Wanda per-layer with the OWL and
the sensitivity-scan allocations (the scan: every unit alone at 0.5/0.7/0.9, measured on 64 digits/train images
outside the calibration sample).

Protocol (METRICS.md): 128 calibration images from digits/train (torch.randperm, seed 0), units =
ConvNeXt stages / ViT blocks calibrated in order, every Linear and 1x1 conv inside them pruned, stem and
head dense; evaluation on digits/val (450 images) with the model's own timm data config.

    python benchmarks/vision_digits.py [--sparsities 0.5 0.6 0.7 0.8 0.9] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import re
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import prunekit
from prunekit.data.images import data_config, heldout_indices, image_calibration, image_dataset, image_transform
from prunekit.eval.image import evaluate_image
from prunekit.io import write_json
from prunekit.io.timm import load_vision_model
from prunekit.sensitivity import sensitivity

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
MODELS = ("convnext-digits", "vit-digits")
SETTINGS = (
    ("magnitude", "per-layer", "uniform"),
    ("magnitude", "per-output", "uniform"),
    ("wanda", "per-layer", "uniform"),
    ("wanda", "per-output", "uniform"),
    ("wanda", "per-layer", "owl"),
    ("wanda", "per-layer", "sensitivity"),
)
REFERENCE_COLUMNS = {
    "magnitude per-layer": ("magnitude", "per-layer", "uniform"),
    "Wanda per-layer": ("wanda", "per-layer", "uniform"),
    "Wanda per-output": ("wanda", "per-output", "uniform"),
}


def val_tensors(model) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = image_dataset(FIXTURES / "digits" / "val", image_transform(data_config(model)))
    return torch.stack([dataset[i][0] for i in range(len(dataset))]), torch.tensor(dataset.targets)


@torch.no_grad()
def top1_and_loss(model, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    logits = torch.cat([model(b) for b in images.split(150)])
    return {"top1": (logits.argmax(1) == labels).float().mean().item(), "loss": F.cross_entropy(logits, labels).item()}


def heldout_tensors(model, holdout: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of digits/train outside the 128-image calibration sample (``prunekit.data.images.heldout_indices``)."""
    dataset = image_dataset(FIXTURES / "digits" / "train", image_transform(data_config(model)))
    chosen = heldout_indices(dataset.targets, 128, 0, holdout)
    return torch.stack([dataset[i][0] for i in chosen]), torch.tensor([dataset.targets[i] for i in chosen])


def scan_file(model, calib, folder: Path) -> Path:
    """Wanda per-layer sensitivity of each unit, on held-out training images, as the sensitivity allocation reads."""
    images, labels = heldout_tensors(model)
    scan = sensitivity(model, "wanda", calib, lambda m: top1_and_loss(m, images, labels), progress=False)
    path = folder / "sensitivity.json"
    path.write_text(json.dumps(scan.to_dict()))
    return path


def run_model(name: str, sparsities: list[float]) -> list[dict]:
    source = f"local-dir:{FIXTURES / name}"
    model = load_vision_model(source)
    images, labels = val_tensors(model)
    calib = image_calibration(model, FIXTURES / "digits" / "train", nsamples=128, batch_size=32, seed=0)
    with tempfile.TemporaryDirectory() as scratch:
        scan = scan_file(model, calib, Path(scratch))
        return _runs(name, source, model, images, labels, calib, scan, sparsities)


def _runs(name, source, model, images, labels, calib, scan: Path, sparsities: list[float]) -> list[dict]:
    dense = top1_and_loss(model, images, labels)
    lightning = evaluate_image(model, FIXTURES / "digits" / "val", batch_size=150, progress=False)
    rows = [
        {
            "model": name,
            "method": "dense",
            "group": None,
            "allocation": None,
            "sparsity": 0.0,
            **dense,
            "lightning_top1": lightning["top1"],
            "lightning_top5": lightning["top5"],
        }
    ]
    for sparsity in sparsities:
        for method, group, allocation in SETTINGS:
            model = load_vision_model(source)
            start = time.perf_counter()
            params = {"scan": str(scan)} if allocation == "sensitivity" else {}
            report = prunekit.prune(
                model, method, sparsity, group=group, calib=calib, allocation=allocation, allocation_params=params
            )
            rows.append(
                {
                    "model": name,
                    "method": method,
                    "group": group,
                    "allocation": allocation,
                    "sparsity": sparsity,
                    "achieved_sparsity": report.sparsity,
                    "layers": len(report.layers),
                    "prune_s": time.perf_counter() - start,
                    **top1_and_loss(model, images, labels),
                }
            )
            print(
                f"{name} {method:9s} {group:10s} {allocation:11s} {sparsity:.0%}: top-1 {rows[-1]['top1']:.4f} "
                f"CE {rows[-1]['loss']:.3f} ({rows[-1]['prune_s']:.1f}s)",
                flush=True,
            )
    return rows


def reference_table(path: Path = FIXTURES / "METRICS.md") -> dict[tuple, tuple[float, float]]:
    """``{(model, method, group, allocation, sparsity): (top1, loss)}`` read from the digits table of METRICS.md."""
    section = path.read_text().split("## digits vision fixtures", 1)[1].splitlines()
    start = next(i for i, line in enumerate(section) if line.startswith("|"))
    lines = list(itertools.takewhile(lambda line: line.startswith("|"), section[start:]))  # its first table only
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    table, model = {}, None
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        model = cells[0] or model
        sparsity = int(cells[1].rstrip("%")) / 100
        for column, cell in zip(header[2:], cells[2:]):
            top1, loss = (float(x) for x in re.findall(r"[\d.]+", cell))
            method, group, allocation = REFERENCE_COLUMNS[column]
            table[(model, method, group, allocation, sparsity)] = (top1, loss)
    return table


def markdown(rows: list[dict], reference: dict) -> str:
    out = [
        "# Digits vision fixtures: magnitude vs Wanda, per-layer vs per-output",
        "",
        "Validation top-1 / mean cross-entropy on digits/val (450 images). 128 calibration images from "
        "digits/train (torch.randperm seed 0), units calibrated in order, every Linear and 1x1 conv inside "
        "the units pruned, stem and head dense. `ref` = METRICS.md (independent implementation), where it "
        "has the cell.",
        "",
    ]
    for name in dict.fromkeys(r["model"] for r in rows):
        dense = next(r for r in rows if r["model"] == name and r["method"] == "dense")
        out += [
            f"## {name}",
            "",
            f"Dense: {dense['top1']:.4f} / {dense['loss']:.3f} (Lightning eval: top-1 "
            f"{dense['lightning_top1']:.4f}, top-5 {dense['lightning_top5']:.4f})",
            "",
            "| sparsity | " + " | ".join(_label(*setting) for setting in SETTINGS) + " |",
            "|---" * (len(SETTINGS) + 1) + "|",
        ]
        for sparsity in sorted({r["sparsity"] for r in rows if r["model"] == name and r["method"] != "dense"}):
            cells = [_cell(rows, reference, name, *setting, sparsity) for setting in SETTINGS]
            out.append(f"| {sparsity:.0%} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _label(method: str, group: str, allocation: str) -> str:
    return f"{method} {group}" + ("" if allocation == "uniform" else f" + {allocation}")


def _cell(rows, reference, name, method, group, allocation, sparsity) -> str:
    key = (name, method, group, allocation, sparsity)
    row = next(r for r in rows if (r["model"], r["method"], r["group"], r["allocation"], r["sparsity"]) == key)
    text = f"{row['top1']:.4f} / {row['loss']:.3f}"
    ref = reference.get(key)
    return text + (f" (ref {ref[0]:.4f} / {ref[1]:.3f})" if ref else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.WARNING)
    rows = [r for name in args.models for r in run_model(name, args.sparsities)]
    reference = reference_table()
    write_json(
        args.out / "vision_digits.json",
        {
            "protocol": "128 calib images digits/train, randperm seed 0, sequential units, Linear+1x1 conv in units",
            "results": rows,
            "reference": [
                {"model": k[0], "method": k[1], "group": k[2], "sparsity": k[4], "top1": v[0], "loss": v[1]}
                for k, v in reference.items()
            ],
            "versions": prunekit.api.versions(),
        },
    )
    (args.out / "vision_digits.md").write_text(markdown(rows, reference) + "\n")
    print(markdown(rows, reference))


if __name__ == "__main__":
    main()
