"""The docs pages are generated from benchmarks/results (``benchmarks/docs.py``): the generator's markers, and
the committed pages checked against a fresh generation so a stale page fails."""

import json
import re
from pathlib import Path

import pytest

from benchmarks.docs import build_docs, json_value, render_docs, render_page, render_regions
from prunekit.cli import main
from prunekit.errors import PrunekitError

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = "python benchmarks/docs.py"


# ---------------------------------------------------------------- the committed pages


def test_committed_docs_are_generated_from_the_results():
    pages = render_docs(ROOT / "benchmarks" / "results", ROOT / "docs")
    assert pages, "no templates in docs/templates"
    for path, text in pages.items():
        assert path.is_file(), f"{path.name} is missing: run `{REGENERATE}`"
        assert path.read_text(encoding="utf-8") == text, f"docs/{path.name} is stale: run `{REGENERATE}`"
    orphans = {p.name for p in (ROOT / "docs").glob("*.md")} - {p.name for p in pages}
    assert not orphans, f"pages without a template in docs/templates: {sorted(orphans)}"


def test_readme_tables_are_generated_from_the_results():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "<!-- include support.md -->" in readme, "the supported-architectures table is generated"
    assert render_regions(readme, ROOT / "benchmarks" / "results") == readme, f"README.md is stale: run `{REGENERATE}`"


def test_regions_are_refilled_and_the_rest_kept(tmp_path):
    (tmp_path / "t.md").write_text("| a |\n")
    text = "intro\n<!-- include t.md -->\nold table\n<!-- end include -->\noutro\n"
    assert render_regions(text, tmp_path) == "intro\n<!-- include t.md -->\n| a |\n<!-- end include -->\noutro\n"
    with pytest.raises(PrunekitError, match="missing.md"):
        render_regions("<!-- include missing.md -->\n<!-- end include -->", tmp_path)


def _typed_numbers(template: str) -> list[str]:
    """Numbers written in a template's prose: not in markers, code, comments or link targets; ``2:4`` (a pattern's
    name), years, and digits inside words (``top-1``, ``float32``, ``ResNet-18``) are names, not results."""
    for pattern in (
        r"```.*?```",
        r"`[^`]*`",
        r"\{\{.*?\}\}",
        r"<!--.*?-->",
        r"\]\([^)]*\)",
        r"\b\d+:\d+\b",
        r"\b(?:19|20)\d\d\b",
    ):
        template = re.sub(pattern, " ", template, flags=re.S)
    return re.findall(r"(?<![\w.\-/])\d+(?:[.,]\d+)*", template)


@pytest.mark.parametrize("template", sorted((ROOT / "docs" / "templates").glob("*.md")), ids=lambda p: p.name)
def test_templates_hold_no_typed_numbers(template):
    assert _typed_numbers(template.read_text(encoding="utf-8")) == []


def test_the_typed_number_check_catches_numbers():
    assert _typed_numbers("ppl 47.86 at 70% on 4 blocks") == ["47.86", "70", "4"]
    assert _typed_numbers("top-1 of ResNet-18 in float32 at 2:4 (Sun et al. 2023) `--seqlen 256` {{ value a b }}") == []


# ---------------------------------------------------------------- markers


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "bench.json").write_text(
        json.dumps(
            {
                "dense": 46.61646,
                "version": "2.14.1",
                "cells": {
                    "wanda@0.5": {"ppl": 47.8599, "sparsity": 0.5},
                    "wanda@2:4": {"ppl": 49.5024, "sparsity": 0.5},
                    "sparsegpt@0.7": {"ppl": 48.139},
                },
                "rows": [
                    {"method": "a", "cfg": {"k": 0.5}, "top1": 0.98444},
                    {"method": "b, c", "cfg": {"k": 0.7}, "top1": 0.5},
                ],
            }
        )
    )
    (folder / "bench.md").write_text("# Bench title\n\nProse 1.\n\n## Section\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    (folder / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return folder


def _page(template, results, out=None):
    return render_page(template, results, out or results.parent / "docs", "t.md").split("\n", 1)[1]


def test_value_marker_walks_keys_indices_and_selectors(results):
    assert _page("{{ value bench.json dense }} / {{ value bench.json dense :.1f }}", results) == "46.62 / 46.6"
    assert _page("{{ value bench.json cells wanda@0.5 sparsity :.0% }}", results) == "50%"
    assert _page("{{ value bench.json rows 1 top1 }}|{{ value bench.json version }}", results) == "0.5000|2.14.1"
    assert _page('{{ value bench.json rows "[method=b, c,cfg.k=0.7]" top1 :.2f }}', results) == "0.50"
    assert json_value({"r": [{"a": {"b": 1}, "v": 2}]}, ["r", "[a.b=1]", "v"]) == 2


def test_include_nests_a_results_page_under_the_section(results):
    assert _page("{{ include bench.md }}", results) == "Prose 1.\n\n### Section\n\n| a | b |\n|---|---|\n| 1 | 2 |"


def test_pivot_marker_is_the_report_table_without_empty_settings(results):
    table = _page("{{ pivot ppl bench.json }}", results).splitlines()
    assert table[0] == "| ppl | wanda | sparsegpt |"
    assert table[2:] == ["| 50% | 47.86 | – |", "| 70% | – | 48.14 |", "| 2:4 | 49.50 | – |"]


def test_image_marker_links_relative_to_the_page(results, tmp_path):
    assert _page("{{ image plot.png 'a plot' }}", results, tmp_path / "docs") == "![a plot](../results/plot.png)"
    with pytest.raises(PrunekitError, match="missing.png"):
        _page("{{ image missing.png }}", results)


def test_markers_after_a_backtick_are_examples_left_alone(results):
    assert _page("`{{ value FILE.json KEY }}`", results) == "`{{ value FILE.json KEY }}`"


@pytest.mark.parametrize(
    "marker, message",
    [
        ("{{ value bench.json cells nope ppl }}", "nope"),
        ("{{ value bench.json rows [method=z] top1 }}", "method=z"),
        ("{{ value bench.json cells }}", "dict"),
        ("{{ value absent.json x }}", "absent.json"),
        ("{{ table bench.md }}", "unknown marker 'table'"),
        ("{{ }}", "cannot fill"),
    ],
)
def test_a_marker_that_cannot_be_filled_names_the_template_and_the_marker(results, marker, message):
    with pytest.raises(PrunekitError, match="t.md") as err:
        _page(f"text {marker} text", results)
    assert message in str(err.value)


def test_build_docs_writes_one_page_per_template(results, tmp_path):
    docs = tmp_path / "docs"
    (docs / "templates").mkdir(parents=True)
    (docs / "templates" / "a.md").write_text("# A\n\nDense {{ value bench.json dense }}.\n")
    (docs / "templates" / "b.md").write_text("# B\n")
    assert [p.name for p in build_docs(results, docs)] == ["a.md", "b.md"]
    text = (docs / "a.md").read_text()
    assert text.startswith("<!-- Generated by `python benchmarks/docs.py`") and text.endswith("# A\n\nDense 46.62.\n")
    with pytest.raises(PrunekitError, match="templates"):
        build_docs(results, tmp_path / "elsewhere")


def test_the_docs_script_writes_pages_and_the_user_command_does_not(results, tmp_path, capsys):
    """Issue 28 item 10: the docs-templating engine was a user command (``prunekit report --docs``); it is a
    developer script now."""
    import subprocess
    import sys

    docs = tmp_path / "docs"
    (docs / "templates").mkdir(parents=True)
    (docs / "templates" / "p.md").write_text("{{ value bench.json cells sparsegpt@0.7 ppl }}\n")
    script = [sys.executable, str(ROOT / "benchmarks" / "docs.py"), "--results", str(results), "--out", str(docs)]
    done = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (docs / "p.md").read_text().endswith("48.14\n") and "page:" in done.stdout
    with pytest.raises(SystemExit):
        main(["report", "--docs", str(results), "--out", str(docs)])
    assert "--docs" in capsys.readouterr().err
