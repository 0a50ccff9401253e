"""The table of supported architectures, established by running every capability check of
``tests.zoo.support`` on every tiny zoo model (nothing downloaded). Writes
benchmarks/results/support.{json,md}; the README's table is generated from it (``python benchmarks/docs.py``), and
``tests/test_architectures.py`` fails when what prunekit does no longer matches the recorded table. Also writes the
table of model classes (``model_classes.md``, from ``prunekit.model_classes``), which the README includes.

    python benchmarks/support.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the zoo lives with the tests (tests/zoo), not in the installed package

from tests.zoo import ZOO  # noqa: E402
from tests.zoo.support import markdown, model_class_markdown, support_matrix  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", help="recompute these architectures, keep the others' rows")
    args = parser.parse_args()
    path = RESULTS / "support.json"
    matrix = json.loads(path.read_text()) if args.only and path.exists() else {}
    matrix.update(support_matrix(args.only))
    matrix = {name: matrix[name] for name in ZOO if name in matrix}  # rows in the zoo's order
    path.write_text(json.dumps(matrix, indent=2) + "\n")
    (RESULTS / "support.md").write_text(markdown(matrix))
    (RESULTS / "model_classes.md").write_text(model_class_markdown())
    print(markdown(matrix))


if __name__ == "__main__":
    main()
