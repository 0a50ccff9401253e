"""Every recipe in recipes/ runs as shipped, with its own command, from a copy of the repository that has only
the package and the recipes (no ../shared/fixtures beside it), offline; its output appears, and what it prints
has no line twice in a row and no advert."""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
FINETUNE_KEYS = {"schedule", "lora", "max_steps"}


def command(recipe: Path) -> tuple[list[str], str | None]:
    """The command a recipe is written for, and the output it writes (relative to the repository root; an
    evaluation writes none unless asked: it prints its result)."""
    data = yaml.safe_load(recipe.read_text())
    rel = f"recipes/{recipe.name}"
    if "trainer" in data:  # a Lightning evaluation config: perplexity when it has a sequence length
        kind = "ppl" if "seqlen" in data["data"] else "image"
        return ["eval", kind, "--recipe", rel], data.get("results")
    return ["finetune" if FINETUNE_KEYS & set(data) else "prune", "--recipe", rel], data["out"]


def outputs(recipe: Path) -> str:
    return command(recipe)[1]


def test_recipes_use_only_shipped_files_and_write_apart():
    """Paths in a recipe are relative to the repository root and point inside it (no ../shared), and no two
    recipes write the same output."""
    for recipe in RECIPES:
        text = recipe.read_text()
        assert "shared" not in text and "../" not in text, recipe.name
        assert sum(line.startswith("# Real data:") for line in text.splitlines()) == 1, recipe.name
        data = yaml.safe_load(text)
        sections = [data, data.get("model") or {}, data.get("data") or {}]
        paths = [
            v
            for s in sections
            if isinstance(s, dict)
            for k, v in s.items()
            if k in ("model", "source", "calib_data", "train_data", "eval_data", "val_data", "path")
            and isinstance(v, str)
        ]
        for path in paths:
            assert (ROOT / path.removeprefix("local-dir:")).exists(), (recipe.name, path)
    outs = [outputs(r) for r in RECIPES if outputs(r) is not None]
    assert len(set(outs)) == len(outs)
    assert all(out.startswith("out/recipes/") for out in outs)


def repeated_line(text: str) -> str | None:
    """A log line printed twice in a row (once per handler), ignoring the level / logger-name prefix; of a line
    a progress bar redraws with carriage returns, only what the terminal ends up showing counts."""
    shown = (line.split("\r")[-1] for line in text.split("\n"))
    lines = [re.sub(r"^[A-Z]+( [\w.]+)?: ", "", line) for line in shown if line.strip()]
    return next((a for a, b in zip(lines, lines[1:]) if a == b and not set(a) <= set("─━│┃ ")), None)


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("clone") / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "prunekit", repo / "prunekit", ignore=ignore)
    shutil.copytree(ROOT / "recipes", repo / "recipes", ignore=ignore)
    assert not (repo.parent / "shared").exists()
    return repo


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_as_shipped(recipe, fresh_clone):
    args, out = command(recipe)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": str(fresh_clone),
    }
    start, cpu = time.perf_counter(), _children_cpu()
    run = subprocess.run(
        [sys.executable, "-m", "prunekit.cli", *args],
        cwd=fresh_clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu
    assert run.returncode == 0, f"{' '.join(args)} failed after {seconds:.0f}s:\n{run.stderr[-3000:]}"
    printed = run.stdout + run.stderr
    assert (fresh_clone / out).exists() if out else ("top-1" in run.stdout or "perplexity" in run.stdout)
    assert repeated_line(run.stderr) is None and "litlogger" not in printed and "Tip:" not in printed
    print(f"{recipe.name}: {seconds:.1f}s wall, {cpu:.1f}s CPU")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
