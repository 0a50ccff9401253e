import json

import pytest

import prunekit
from prunekit.errors import PrunekitError
from prunekit.report import (
    build_report,
    flat_metrics,
    load_runs,
    measured_sparsity,
    pivot_table,
    run_label,
    run_setting,
    runs_from_cells,
    runs_table,
)
from tests.conftest import tiny_llama


def _run(
    method="wanda",
    sparsity=0.5,
    pattern=None,
    update=None,
    allocation="uniform",
    ppl=50.0,
    total_s=1.0,
    layer_sparsity=(0.5, 0.5),
):
    layers = {
        f"model.layers.{i}.mlp.down_proj": {"sparsity": s, "numel": 64, "target": s}
        for i, s in enumerate(layer_sparsity)
    }
    return {
        "settings": {
            "method": method,
            "sparsity": sparsity,
            "pattern": pattern,
            "update": update,
            "allocation": allocation,
        },
        "layers": layers,
        "sparsity": sparsity,
        "timings": {"total_s": total_s},
        "metrics": {"ppl_dense": 46.6, "ppl": ppl, "eval_seqlen": 256},
    }


def _write(dir_, run):
    dir_.mkdir(parents=True)
    (dir_ / "prune_report.json").write_text(json.dumps(run))
    return dir_


def test_labels_settings_and_metrics():
    run = _run(update=["dsnot"], allocation="owl", pattern="2:4")
    assert run_label(run) == "wanda+dsnot+owl" and run_setting(run) == "2:4"
    assert run_setting(_run(sparsity=0.7)) == "70%"
    run["metrics"]["zeroshot"] = {"tasks": {}, "mean": {"acc": 0.25}}
    assert flat_metrics(run) == {"ppl_dense": 46.6, "ppl": 50.0, "zeroshot_acc": 0.25}


def test_tables_hold_every_run():
    runs = [
        _run(sparsity=0.5, ppl=48.0),
        _run(sparsity=0.7, ppl=57.125),
        _run(method="ria", ppl=47.5),
        _run(pattern="2:4", ppl=49.5),
    ]
    pivot = pivot_table(runs, "ppl")
    assert pivot.splitlines()[0] == "| ppl | wanda | ria |"
    assert "| 50% | 48.00 | 47.50 |" in pivot and "| 70% | 57.12 | – |" in pivot and "| 2:4 | 49.50 | – |" in pivot
    assert len(runs_table(runs).splitlines()) == 2 + len(runs)


def test_build_report_writes_table_and_plots(tmp_path):
    dirs = [
        _write(tmp_path / f"run{i}", r)
        for i, r in enumerate(
            [
                _run(sparsity=0.5, ppl=48.0, total_s=2.0),
                _run(sparsity=0.7, ppl=57.0),
                _run(allocation="owl", ppl=47.0, layer_sparsity=(0.42, 0.58)),
                _run(pattern="2:4", ppl=49.5),
            ]
        )
    ]
    many = tmp_path / "more.json"  # a benchmark file holding several runs
    many.write_text(json.dumps({"runs": [_run(method="ria", sparsity=s, ppl=45 + 10 * s) for s in (0.5, 0.7)]}))
    files = build_report(dirs + [many], tmp_path / "out", title="kjv")
    for key in ("metric", "layer_sparsity", "prune_time"):
        assert files[key].suffix == ".png" and files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files["markdown"].name == "report.md"
    text = files["markdown"].read_text()
    assert text.startswith("# kjv") and "wanda+owl" in text and "ria" in text and "ppl_vs_sparsity.png" in text


def test_build_report_reads_a_real_prune_report(tmp_path):
    report = prunekit.prune(tiny_llama(), "magnitude", 0.5)
    report.metrics["ppl"] = 123.0
    files = build_report([_write(tmp_path / "run", report.to_dict())], tmp_path / "out")
    assert "| magnitude | 50% | 50.00% |" in files["markdown"].read_text()


def test_load_runs_errors(tmp_path):
    with pytest.raises(PrunekitError, match="prune_report.json"):
        load_runs([tmp_path])
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(ValueError, match="no pruning runs"):
        load_runs([tmp_path / "x.json"])


def test_benchmark_cell_summaries_are_read_as_runs(tmp_path):
    summary = {
        "dense_ppl": 46.6,
        "cells": {
            "sparsegpt@0.5": {"ppl": 46.8, "sparsity": 0.5, "prune_s": 3.0},
            "wanda+admm@2:4": {"ppl": 46.78, "sparsity": 0.5, "prune_s": 4.0},
        },
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    runs = load_runs([tmp_path / "summary.json"])
    assert [(run_label(r), run_setting(r)) for r in runs] == [("sparsegpt", "50%"), ("wanda+admm", "2:4")]
    assert flat_metrics(runs[1]) == {"ppl": 46.78, "ppl_dense": 46.6}
    files = build_report([tmp_path / "summary.json", _write(tmp_path / "run", _run())], tmp_path / "out")
    assert "| 50% | 46.80 | – | 50.00 |" in files["markdown"].read_text()


def test_pivot_keeps_a_metric_when_a_later_file_repeats_the_run_without_it():
    """Combining a zero-shot benchmark with a perplexity-only one must not blank the zero-shot cells."""
    with_acc = _run(ppl=48.0)
    with_acc["metrics"]["zeroshot"] = {"tasks": {}, "mean": {"acc": 0.41}}
    pivot = pivot_table([with_acc, _run(ppl=48.0)], "zeroshot_acc")
    assert "| 50% | 0.4100 |" in pivot


def test_run_directories_pick_up_eval_results_saved_beside_the_report(tmp_path):
    """prune -> prunekit eval zeroshot/ppl --json RUN/...json -> prunekit report RUN: the evaluations are in it."""
    run = _write(tmp_path / "run", _run(ppl=48.0))
    (run / "zeroshot.json").write_text(json.dumps({"tasks": {"boolq": {"acc": 0.6}}, "mean": {"acc": 0.6}}))
    (run / "ppl.json").write_text(json.dumps({"model": "run", "seqlen": 2048, "ppl": 47.5}))
    (run / "notes.json").write_text(json.dumps(["not an eval"]))
    (run_loaded,) = load_runs([run])
    assert flat_metrics(run_loaded) == {"ppl_dense": 46.6, "ppl": 47.5, "zeroshot_acc": 0.6}
    assert "| 50% | 0.6000 |" in build_report([run], tmp_path / "out")["markdown"].read_text()


def test_nm_runs_are_as_sparse_as_their_pattern():
    """Defect 10: N:M keeps N of every M weights, so a 1:4 run is 75% sparse, not 50%; a measured sparsity wins."""
    runs = runs_from_cells(
        {"wanda@1:4": {"ppl": 60.0}, "wanda@2:4": {"ppl": 50.0}, "sparsegpt@1:4": {"ppl": 55.0, "sparsity": 0.7493}}
    )
    assert [r["settings"]["sparsity"] for r in runs] == [0.75, 0.5, 0.75]
    assert [measured_sparsity(r) for r in runs] == [0.75, 0.5, 0.7493]
    assert "| wanda | 1:4 | 75.00% |" in runs_table(runs)
    report_without_overall = {"settings": {"method": "magnitude", "sparsity": 0.5, "pattern": "1:4"}}
    assert measured_sparsity(report_without_overall) == 0.75
