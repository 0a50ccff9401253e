"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness, on the model already in memory.

The pruned model is wrapped in ``lm_eval``'s ``HFLM`` as it is (no save and reload), so what is scored
is exactly what was pruned. Local task folders (YAML + data) are added with ``include_path``; when every
requested task is found there, lm-eval's few thousand built-in task configs are not indexed at all
(that alone takes seconds), which also keeps local evaluations off the network.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from ..errors import PrunekitError
from ..forward import eval_mode

log = logging.getLogger(__name__)

METRICS = ("acc", "acc_norm")


def parse_tasks(tasks: str | Iterable[str]) -> list[str]:
    """``"boolq,piqa"`` or ``["boolq", "piqa"]`` -> ``["boolq", "piqa"]``."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise PrunekitError("no zero-shot tasks given; pass task names, e.g. --tasks boolq,piqa,hellaswag")
    return names


def task_manager(tasks: list[str], include_path: str | os.PathLike | None = None):
    """A TaskManager that knows ``tasks``: the local folder alone when it has them all, else with lm-eval's own."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not os.path.isdir(include_path):
            raise PrunekitError(f"task folder {str(include_path)!r} does not exist (--include-path)")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise PrunekitError(
            f"unknown lm-eval task(s) {unknown}; check the names (lm-eval --tasks list) or add the "
            "folder with their YAML files via include_path / --include-path"
        )
    return manager


def zeroshot(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Iterable[str],
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Accuracy of ``model`` on lm-eval ``tasks``: ``{"tasks": {name: {metric: value, "n": docs}},
    "mean": {metric: mean over tasks}, "settings": {...}}``; metrics are ``acc`` / ``acc_norm``
    (with ``*_stderr``) where the task reports them. ``limit`` caps the documents per task."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    names = parse_tasks(tasks)
    manager = task_manager(names, include_path)
    with eval_mode(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=False
        )
    per_task = {name: task_metrics(out["results"].get(name, {}), out.get("n-samples", {}).get(name)) for name in names}
    settings = dict(
        tasks=names,
        batch_size=batch_size,
        limit=limit,
        num_fewshot=num_fewshot,
        include_path=str(include_path) if include_path else None,
    )
    return {"tasks": per_task, "mean": mean_metrics(per_task), "settings": settings}


def task_metrics(row: Mapping[str, Any], samples: Mapping[str, int] | None = None) -> dict[str, float]:
    """lm-eval's ``{"acc,none": v, "acc_stderr,none": s, ...}`` -> ``{"acc": v, "acc_stderr": s, ..., "n": docs}``."""
    out: dict[str, float] = {}
    for key, value in row.items():
        metric, _, _ = key.partition(",")
        if metric.removesuffix("_stderr") in METRICS and isinstance(value, (int, float)):
            out.setdefault(metric, float(value))
    if samples:
        out["n"] = int(samples.get("effective", samples.get("original", 0)))
    return out


def mean_metrics(per_task: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean over tasks of each metric every task reports (the papers' "average" column)."""
    means = {}
    for metric in METRICS:
        values = [m[metric] for m in per_task.values() if metric in m]
        if values and len(values) == len(per_task):
            means[metric] = sum(values) / len(values)
    return means


def format_table(result: Mapping[str, Any], metrics: Iterable[str] = METRICS) -> str:
    """A markdown table: one row per task plus the mean, one column per metric, as fractions with 4 decimals
    (``0.4150 ± 0.0120``), the form the README and docs report accuracy in."""
    metrics = list(metrics)
    lines = ["| task | " + " | ".join(metrics) + " | docs |", "|---|" + "---|" * (len(metrics) + 1)]
    for name, row in result["tasks"].items():
        cells = [_fraction(row.get(m), row.get(f"{m}_stderr")) for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row.get('n', '')} |")
    lines.append("| **mean** | " + " | ".join(_fraction(result["mean"].get(m)) for m in metrics) + " | |")
    return "\n".join(lines)


def _fraction(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, float) else "")
