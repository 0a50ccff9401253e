"""Build kjv_cloze.json: finish a King James verse, 4 choices (the true ending + 3 endings of other verses).

A local, offline multiple-choice task in the HellaSwag style for the kjv-llama-5m fixture. Run from the
repository root: ``python tests/data/zeroshot_task/make_kjv_cloze.py [n_items]``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SOURCE = Path("../shared/fixtures/kjv/test.txt")
OUT = Path(__file__).with_name("kjv_cloze.json")


def split_verse(verse: str) -> tuple[str, str]:
    """Context = the first two thirds of the words, ending = the rest."""
    words = verse.split()
    cut = (2 * len(words)) // 3
    return " ".join(words[:cut]), " ".join(words[cut:])


def build(verses: list[str], n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    picked = rng.sample([v for v in verses if 12 <= len(v.split()) <= 40], n)
    endings = [split_verse(v)[1] for v in picked]
    items = []
    for i, verse in enumerate(picked):
        context, ending = split_verse(verse)
        others = rng.sample([e for j, e in enumerate(endings) if j != i and e != ending], 3)
        label = rng.randrange(4)
        choices = others[:label] + [ending] + others[label:]
        items.append({"context": context, "endings": choices, "label": label})
    return items


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    lines = [line.strip() for line in SOURCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    OUT.write_text(json.dumps(build(lines, n), indent=0) + "\n", encoding="utf-8")
    print(f"wrote {n} items to {OUT}")
