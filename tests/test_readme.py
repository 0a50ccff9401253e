"""The README's quick start runs as pasted on a fresh clone: its bash and Python blocks are extracted and run in a
temporary copy of the package (no ../shared, no network)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EVAL_LINES = 400  # the copy's kjv/test.txt is cut to its first verses so the two evaluations take seconds
CALIB_LINES = 2000  # and its train.txt (tokenised twice, by the CLI and by the Python block) to ~70k tokens, 8x
#                     the 32 x 256 the quick start samples


def quick_start_blocks(readme: str) -> dict[str, str]:
    """The first ```bash and ```python blocks of the ``## Quick start`` section."""
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = dict(reversed(re.findall(r"^```(bash|python)\n(.*?)^```$", section, flags=re.S | re.M)))
    assert set(blocks) == {"bash", "python"}, "the Quick start section needs a ```bash and a ```python block"
    return blocks


def fresh_clone(tmp: Path) -> Path:
    """The package with its assets, plus the ``.venv/bin`` entry points that ``.ci/setup`` would create."""
    root = tmp / "prunekit-clone"
    shutil.copytree(ROOT / "prunekit", root / "prunekit", ignore=shutil.ignore_patterns("__pycache__"))
    for name, lines in (("test.txt", EVAL_LINES), ("train.txt", CALIB_LINES)):
        text = root / "prunekit" / "assets" / "kjv" / name
        text.write_text("".join(text.read_text(encoding="utf-8").splitlines(True)[:lines]), encoding="utf-8")
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, args in (("python", ""), ("prunekit", " -m prunekit.cli"), ("torchrun", " -m torch.distributed.run")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}"{args} "$@"\n')
        (bin_dir / name).chmod(0o755)
    return root


def run(args: list[str], cwd: Path) -> str:
    env = dict(
        os.environ,
        PYTHONPATH=str(cwd),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TQDM_DISABLE="1",
    )
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"{args[:2]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_quick_start_blocks_are_found():
    blocks = quick_start_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert ".venv/bin/prunekit prune" in blocks["bash"] and "prunekit.prune(" in blocks["python"]
    assert "../shared" not in blocks["bash"] + blocks["python"]


@pytest.mark.slow
def test_readme_quick_start_runs_as_pasted(tmp_path):
    blocks = quick_start_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    clone = fresh_clone(tmp_path)
    out = run(["bash", "-euo", "pipefail", "-c", blocks["bash"]], clone)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    dense, pruned = re.search(r"`ppl_dense=([\d.]+)  ppl=([\d.]+)`", readme).groups()  # what the README promises
    assert f"ppl_dense={dense}" in out and f"ppl={pruned}" in out and f"perplexity {pruned}" in out
    report = json.loads((clone / "out" / "quickstart-wanda-50" / "prune_report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01) and report["metrics"]["ppl"] > 1
    out = run([str(clone / ".venv" / "bin" / "python"), "-c", blocks["python"]], clone)
    assert "sparsity 0.5" in out
    saved = clone / "out" / "quickstart-python"  # issue 28 item 11: saved with its tokenizer, as the CLI saves
    assert (saved / "tokenizer_config.json").exists() and (saved / "model.safetensors").exists()


def section_bash(readme: str, title: str) -> str:
    """The first ```bash block of section ``title``."""
    section = readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```bash\n(.*?)^```$", section, flags=re.S | re.M)[0]


@pytest.mark.slow
def test_readme_two_ranks_and_resuming_run_as_pasted(tmp_path):
    """The single-machine torchrun command of "More than one GPU or machine" and the command of "Resuming"."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    clone = fresh_clone(tmp_path)
    for title, out in (("More than one GPU or machine", "two-ranks"), ("Resuming", "resumable")):
        run(["bash", "-euo", "pipefail", "-c", section_bash(readme, title)], clone)
        report = json.loads((clone / "out" / out / "prune_report.json").read_text())
        assert report["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert report["settings"]["lazy"] is True
    assert json.loads((clone / "out" / "two-ranks" / "prune_report.json").read_text())["metrics"]["world_size"] == 2


def methods_table(readme: str) -> dict[tuple[str, str], dict[str, str]]:
    """``{(kind, name): {parameter: default text}}`` from the README's methods table."""
    section = readme.split("\n## Methods\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        match = re.fullmatch(r"(?:(update|allocation|structured) )?`([\w-]+)`", cells[0]) if cells else None
        if match:
            params = dict(re.findall(r"`(\w+)` \(([^)]*)\)", cells[4]))
            rows[(match.group(1) or "method", match.group(2))] = params
    return rows


def test_readme_methods_table_lists_every_registered_name_with_its_defaults():
    import dataclasses

    import yaml

    from prunekit.allocate import ALLOCATORS
    from prunekit.methods import METHODS, UPDATES
    from prunekit.structured import STRUCTURED

    registries = {"method": METHODS, "update": UPDATES, "allocation": ALLOCATORS, "structured": STRUCTURED}
    rows = methods_table((ROOT / "README.md").read_text(encoding="utf-8"))
    listed = {(kind, name) for kind, reg in registries.items() for name in reg.names() if name != "uniform"}
    assert set(rows) == listed
    for (kind, name), params in rows.items():
        fields = {f.name: f for f in dataclasses.fields(registries[kind][name])}
        for param, text in params.items():
            assert param in fields, f"{name} has no parameter {param}"
            default = text.split(";")[0].strip("` ")
            if not default.startswith("="):  # "(= sparsity)": the default follows another setting
                assert yaml.safe_load(default) == fields[param].default, (
                    f"{name}.{param} defaults to {fields[param].default!r}, not {text}"
                )
