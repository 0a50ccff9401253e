"""Compare pruning runs: a markdown table and plots from several ``prune_report.json`` files.

A run is ``PruneReport.to_dict()`` (``settings``, ``layers``, ``sparsity``, ``timings``, ``metrics``) as
saved by ``prunekit prune``; benchmarks may store many of them in one JSON file (a list, or
``{"runs": [...]}``), or a summary ``{"cells": {"label@setting": {"ppl", "sparsity", "prune_s"}},
"dense_ppl"}`` (no per-layer data then). Plots use matplotlib's Agg canvas directly, so no display and no global
backend. (The project's own documentation pages are generated from benchmark results by ``benchmarks/docs.py``, a
developer tool that reuses these tables.)
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import PrunekitError

log = logging.getLogger(__name__)

Run = Mapping[str, Any]
PRIMARY = ("ppl", "top1", "zeroshot_acc", "zeroshot_acc_norm")  # the first one present is plotted
LOWER_IS_BETTER = {"ppl", "ppl_dense", "loss", "loss_dense"}
NOT_METRICS = {"eval_seqlen"}
SCALAR_RESULTS = ("ppl", "top1", "top5", "loss")  # what evaluation files and benchmark cells report


# ---------------------------------------------------------------- reading runs


def load_runs(paths: Iterable[str | Path]) -> list[dict]:
    """Runs from run directories (their ``prune_report.json`` plus the results of ``prunekit eval ... --json``
    saved beside it) and/or JSON files of one or many runs."""
    runs = []
    for path in map(Path, paths):
        file = path / "prune_report.json" if path.is_dir() else path
        if not file.is_file():
            raise PrunekitError(
                f"{str(path)!r} is neither a run directory with prune_report.json nor a JSON report file"
            )
        data = json.loads(file.read_text(encoding="utf-8"))
        if path.is_dir() and isinstance(data, dict):
            data.setdefault("metrics", {}).update(eval_results(path))
        if isinstance(data, Mapping) and isinstance(data.get("cells"), Mapping):
            data = runs_from_cells(data["cells"], data.get("dense_ppl"))
        found = data if isinstance(data, list) else data.get("runs", [data])
        runs += [r for r in found if _is_run(r, file)]
    if not runs:
        raise PrunekitError("no pruning runs found in the given paths")
    return runs


def eval_results(run_dir: Path) -> dict[str, Any]:
    """Metrics from evaluation JSONs in a run directory, recognised by their keys: zero-shot (``tasks`` and
    ``mean``), perplexity (``ppl``), image classification (``top1``). A later evaluation overrides the
    ``--eval-data`` metrics of the prune report; files in other shapes are left alone."""
    metrics: dict[str, Any] = {}
    for file in sorted(run_dir.glob("*.json")):
        if file.name == "prune_report.json":
            continue
        try:
            result = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(result, Mapping):
            continue
        if isinstance(result.get("tasks"), Mapping) and isinstance(result.get("mean"), Mapping):
            metrics["zeroshot"] = dict(result)
        metrics.update({k: result[k] for k in SCALAR_RESULTS if isinstance(result.get(k), (int, float))})
    return metrics


def runs_from_cells(cells: Mapping[str, Mapping[str, Any]], dense_ppl: float | None = None) -> list[dict]:
    """Benchmark summaries keyed ``"wanda+admm@0.7"`` / ``"sparsegpt@2:4"`` as minimal runs."""
    runs = []
    for key, cell in cells.items():
        label, _, setting = key.rpartition("@")
        pattern = setting if ":" in setting else None
        metrics = {k: v for k, v in cell.items() if k in SCALAR_RESULTS}
        if dense_ppl is not None:
            metrics["ppl_dense"] = dense_ppl
        target = nm_sparsity(pattern) if pattern else float(setting)
        runs.append(
            {
                "label": label,
                "settings": {"method": label, "sparsity": target, "pattern": pattern, "group": cell.get("group")},
                "sparsity": cell.get("sparsity", target),
                "layers": {},
                "metrics": metrics,
                "timings": {"total_s": cell["prune_s"]} if "prune_s" in cell else {},
            }
        )
    return runs


def _is_run(item: Any, file: Path) -> bool:
    if isinstance(item, Mapping) and "settings" in item:
        return True
    log.warning("skipping an entry of %s that is not a prune report (no 'settings')", file)
    return False


def run_label(run: Run) -> str:
    """``wanda``, ``wanda+dsnot``, ``wanda+owl``: method, updates, non-uniform allocation (or ``label``)."""
    if run.get("label"):
        return str(run["label"])
    s = run["settings"]
    updates = [s["update"]] if isinstance(s.get("update"), str) else list(s.get("update") or [])
    alloc = [s["allocation"]] if s.get("allocation") not in (None, "uniform") else []
    return "+".join([str(s.get("method", "?"))] + updates + alloc)


def run_setting(run: Run) -> str:
    """``"2:4"`` for N:M runs, else the target sparsity in percent (``"50%"``)."""
    s = run["settings"]
    return str(s["pattern"]) if s.get("pattern") else f"{100 * float(s['sparsity']):g}%"


def nm_sparsity(pattern: str) -> float:
    """``"1:4"`` -> 0.75: N:M keeps N of every M weights (the hardware convention), so 1 - N/M of them are zero."""
    n, _, m = pattern.partition(":")
    return 1 - int(n) / int(m)


def measured_sparsity(run: Run) -> float:
    """The overall sparsity the run measured, else its target (for N:M: what the pattern implies)."""
    if isinstance(run.get("sparsity"), (int, float)):
        return float(run["sparsity"])
    s = run["settings"]
    return nm_sparsity(s["pattern"]) if s.get("pattern") else float(s["sparsity"])


def flat_metrics(run: Run) -> dict[str, float]:
    """Numeric metrics, with nested ones flattened: ``zeroshot.mean.acc`` -> ``zeroshot_acc``."""
    out = {}
    for key, value in (run.get("metrics") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in NOT_METRICS:
            out[key] = float(value)
        elif isinstance(value, Mapping) and isinstance(value.get("mean"), Mapping):
            out.update({f"{key}_{m}": float(v) for m, v in value["mean"].items() if isinstance(v, (int, float))})
    return out


def primary_metric(runs: Sequence[Run]) -> str | None:
    present = {k for r in runs for k in flat_metrics(r)}
    return next((m for m in PRIMARY if m in present), None)


# ---------------------------------------------------------------- tables


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"


def runs_table(runs: Sequence[Run]) -> str:
    """One row per run: label, setting, measured sparsity, every metric, prune time."""
    metrics = list(dict.fromkeys(k for r in runs for k in flat_metrics(r)))
    head = ["run", "setting", "sparsity"] + metrics + ["prune s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        m = flat_metrics(r)
        cells = [run_label(r), run_setting(r), f"{100 * measured_sparsity(r):.2f}%"]
        cells += [_fmt(m.get(k)) for k in metrics] + [_fmt((r.get("timings") or {}).get("total_s"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pivot_table(runs: Sequence[Run], metric: str, skip_empty: bool = False) -> str:
    """``metric`` with settings as rows and runs (labels) as columns, like the papers' tables; ``skip_empty``
    leaves out settings where no run has the metric."""
    labels = list(dict.fromkeys(run_label(r) for r in runs))
    settings = sorted(dict.fromkeys(run_setting(r) for r in runs), key=_setting_order)
    cell: dict[tuple[str, str], float] = {}
    for r in runs:  # the same label and setting may come from several files: the first that has the metric wins
        value = flat_metrics(r).get(metric)
        if value is not None:
            cell.setdefault((run_setting(r), run_label(r)), value)
    lines = [f"| {metric} | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
    for s in settings:
        if skip_empty and not any((s, lab) in cell for lab in labels):
            continue
        lines.append(f"| {s} | " + " | ".join(_fmt(cell.get((s, lab))) for lab in labels) + " |")
    return "\n".join(lines)


def _setting_order(setting: str) -> tuple[int, float]:
    if setting.endswith("%"):
        return 0, float(setting[:-1])
    n, _, m = setting.partition(":")
    return 1, -int(n) / int(m)


# ---------------------------------------------------------------- plots


def _figure(width: float = 7.0, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_metric(runs: Sequence[Run], metric: str, path: Path) -> Path:
    """``metric`` against target sparsity, one line per run label; N:M runs as labelled markers."""
    fig, ax = _figure()
    annotated: set[str] = set()  # each N:M setting is named once, not once per method on top of each other
    for label in dict.fromkeys(run_label(r) for r in runs):
        mine = [r for r in runs if run_label(r) == label and metric in flat_metrics(r)]
        line = sorted(
            (float(r["settings"]["sparsity"]), flat_metrics(r)[metric])
            for r in mine
            if not r["settings"].get("pattern")
        )
        color = ax.plot(*zip(*line), marker="o", label=label)[0].get_color() if line else None
        for r in (r for r in mine if r["settings"].get("pattern")):
            ax.scatter(
                [measured_sparsity(r)],
                [flat_metrics(r)[metric]],
                marker="x",
                color=color,
                label=None if line else label,
            )
            if run_setting(r) not in annotated:
                annotated.add(run_setting(r))
                ax.annotate(
                    run_setting(r),
                    (measured_sparsity(r), flat_metrics(r)[metric]),
                    fontsize=7,
                    xytext=(-14, 0),
                    textcoords="offset points",
                )
    _dense_line(ax, runs, metric)
    if metric in LOWER_IS_BETTER:
        ax.set_yscale("log")
    ax.set(xlabel="sparsity", ylabel=metric, title=f"{metric} vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _dense_line(ax, runs: Sequence[Run], metric: str) -> None:
    dense = [flat_metrics(r).get(f"{metric}_dense") for r in runs]
    dense = [d for d in dense if d is not None]
    if dense:
        ax.axhline(dense[0], color="gray", linestyle="--", linewidth=1, label="dense")


def layer_sparsity_runs(runs: Sequence[Run]) -> list[Run]:
    """One run per label at the most common unstructured target: the per-layer comparison to draw."""
    runs = [r for r in runs if r.get("layers")] or list(runs)
    targets = [float(r["settings"]["sparsity"]) for r in runs if not r["settings"].get("pattern")]
    if not targets:
        return list({run_label(r): r for r in runs}.values())
    common = max(set(targets), key=lambda t: (targets.count(t), t))
    chosen = [r for r in runs if not r["settings"].get("pattern") and float(r["settings"]["sparsity"]) == common]
    return list({run_label(r): r for r in chosen}.values())


def plot_layer_sparsity(runs: Sequence[Run], path: Path) -> Path:
    """Grouped bars: the measured sparsity of every layer, one colour per run."""
    layers = list(dict.fromkeys(n for r in runs for n in r.get("layers", {})))
    fig, ax = _figure(max(7.0, 0.28 * len(layers) * max(1, len(runs)) ** 0.5), 4.5)
    width = 0.8 / max(len(runs), 1)
    for i, r in enumerate(runs):
        values = [r["layers"].get(n, {}).get("sparsity", float("nan")) for n in layers]
        ax.bar([x + i * width for x in range(len(layers))], values, width, label=f"{run_label(r)} {run_setting(r)}")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(layers))])
    ax.set_xticklabels([_short(n) for n in layers], rotation=90, fontsize=6)
    ax.set(ylabel="sparsity", title="per-layer sparsity")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _short(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``3.self_attn.q_proj``: the block index and the layer."""
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[digits[0] :]) if digits else name


def plot_prune_time(runs: Sequence[Run], path: Path) -> Path:
    """Mean wall time of pruning (``timings.total_s``) per run label."""
    times: dict[str, list[float]] = {}
    for r in runs:
        if "total_s" in (r.get("timings") or {}):
            times.setdefault(run_label(r), []).append(float(r["timings"]["total_s"]))
    fig, ax = _figure(7.0, 0.5 * len(times) + 1.5)
    labels = list(times)
    ax.barh(labels, [sum(v) / len(v) for v in times.values()])
    ax.set(xlabel="seconds (mean over runs)", title="prune time per method")
    return _save(fig, path)


# ---------------------------------------------------------------- the report


def build_report(
    run_dirs: Iterable[str | Path], out_dir: str | Path, title: str = "prunekit report", name: str = "report"
) -> dict[str, Path]:
    """Read the runs, write ``{name}.md`` and the ``{name}_*.png`` plots into ``out_dir``; returns their paths."""
    runs = load_runs(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metric = primary_metric(runs)
    files = {
        "layer_sparsity": plot_layer_sparsity(layer_sparsity_runs(runs), out / f"{name}_layer_sparsity.png"),
        "prune_time": plot_prune_time(runs, out / f"{name}_prune_time.png"),
    }
    if metric is not None:
        files["metric"] = plot_metric(runs, metric, out / f"{name}_{metric}_vs_sparsity.png")
    files["markdown"] = out / f"{name}.md"
    files["markdown"].write_text(report_markdown(runs, metric, files, title), encoding="utf-8")
    log.info("report of %d runs written to %s", len(runs), out)
    return files


def report_markdown(runs: Sequence[Run], metric: str | None, files: Mapping[str, Path], title: str) -> str:
    parts = [f"# {title}", ""]
    present = {k for r in runs for k in flat_metrics(r)}
    for m in [metric] + [m for m in PRIMARY if m in present and m != metric] if metric else []:
        parts += [f"## {m}", "", pivot_table(runs, m), ""]
    parts += ["## All runs", "", runs_table(runs), ""]
    if any(few_token_experts(r) for r in runs):
        parts += ["## MoE experts calibrated on few tokens", "", few_tokens_table(runs), ""]
    parts += [f"![{key}]({path.name})" for key, path in files.items() if path.suffix == ".png"]
    return "\n".join(parts) + "\n"


def few_token_experts(run: Run) -> list[Mapping[str, Any]]:
    """The experts a run's report flagged as calibrated on fewer tokens than its ``expert_min_tokens``."""
    return list((run.get("experts") or {}).get("few_tokens") or [])


def few_tokens_table(runs: Sequence[Run]) -> str:
    """One row per flagged expert: their masks rest on noisy statistics (``expert_tokens: all`` helps)."""
    lines = ["| run | setting | experts | expert | routed tokens |", "|---|---|---|---|---|"]
    for r in runs:
        for row in few_token_experts(r):
            lines.append(
                f"| {run_label(r)} | {run_setting(r)} | {row['experts']} | {row['expert']} | {row['tokens']} |"
            )
    return "\n".join(lines)
