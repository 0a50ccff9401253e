"""Captions for the digits images, for dual encoders (CLIP, SigLIP): image-text data in the format
``prunekit.data.image_text`` reads (``{"image": "val/3/0007.png", "text": "a handwritten three."}`` a line).

Each image gets one caption naming its class, in one of TEMPLATES (a seeded choice per image), with the digit
written as a numeral or a word. Writes ``prunekit/assets/digits/{train,val}-captions.jsonl`` beside the bundled
ImageFolder (image paths relative to that folder, so no image is copied); ``captions`` is also what
``benchmarks/dual_encoder_digits.py`` trains its CLIP-architecture model on.

    python benchmarks/make_digits_captions.py [--images prunekit/assets/digits]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {d}: the numeral (the class folder's name), {w}: the word. The first is prunekit's default zero-shot prompt.
TEMPLATES = (
    "a photo of a {d}.",
    "a handwritten {w}.",
    "the digit {d}",
    "the number {w}, written by hand",
    "a small blurry {d}",
)


def caption(label: str, rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(d=label, w=WORDS[int(label)])


def captions(folder: Path, seed: int = SEED) -> list[dict[str, str]]:
    """One record per image of an ImageFolder of digits (sorted class folders and files), paths relative to
    ``folder.parent``."""
    rng = random.Random(seed)
    return [
        {"image": str(image.relative_to(folder.parent)), "text": caption(label.name, rng)}
        for label in sorted(p for p in folder.iterdir() if p.is_dir())
        for image in sorted(label.glob("*.png"))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=Path, default=ROOT / "prunekit" / "assets" / "digits")
    args = parser.parse_args()
    for split in ("train", "val"):
        records = captions(args.images / split)
        path = args.images / f"{split}-captions.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"{path}: {len(records)} captions")


if __name__ == "__main__":
    main()
