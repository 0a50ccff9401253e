"""The metrics prunekit's evaluations report, read the same way by targets, scans and allocations: which way is
better, how much worse than the dense model a value is (its damage), and which one to show or to allocate on.
No torch here: a recipe checks a target's metric when it is made.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import PrunekitError


@dataclass(frozen=True)
class Metric:
    """How to read one evaluation key: which way is better, and how damage is measured against the dense value
    (``ratio``: log of value / dense, the rise of mean NLL for a perplexity; ``difference``: value - dense, or
    dense - value where higher is better). ``reference``: measured against the dense model's own outputs, so the
    dense model scores 1 by definition."""

    name: str
    higher_is_better: bool
    damage: str = "difference"
    reference: bool = False


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("ppl", False, "ratio"),
        Metric("mlm_ppl", False, "ratio"),
        Metric("decoder_ppl", False, "ratio"),
        Metric("text_ppl", False, "ratio"),
        Metric("top1", True),
        Metric("accuracy", True),
        Metric("agreement", True, reference=True),
        Metric("embedding_cosine", True, reference=True),
        Metric("top5", True),
        Metric("loss", False),
    )
}  # in the order a scan's table prefers them


def metric(name: str) -> Metric:
    if name not in METRICS:
        raise PrunekitError(f"unknown metric {name!r}; a target names one of {', '.join(METRICS)}")
    return METRICS[name]


def damage(name: str, value: float, dense: float) -> float:
    """How much worse ``value`` is than ``dense`` (0 = as good; for perplexities the rise of mean token NLL)."""
    m = METRICS[name]
    if m.damage == "ratio":
        return math.log(value / dense) if value > 0 and dense > 0 else math.inf
    return dense - value if m.higher_is_better else value - dense


def dense_value(name: str, dense: Mapping[str, float]) -> float:
    """The dense model's value of ``name``; metrics against the dense model's own outputs are 1 for it."""
    if name in dense:
        return dense[name]
    if name in METRICS and METRICS[name].reference:
        return 1.0
    raise PrunekitError(f"the dense evaluation reported no {name!r} (it reported {sorted(dense)})")


def primary_metric(measured: Iterable[str]) -> str:
    """The first of ``METRICS`` (``ppl``, ``top1``, ...) among the names an evaluation reported."""
    measured = set(measured)
    found = next((m for m in METRICS if m in measured), None)
    if found is None:
        raise PrunekitError(
            f"the evaluation reported {sorted(measured) or 'nothing'}, none of the metrics prunekit reads "
            f"({', '.join(METRICS)}); give evaluation data (--eval-data) the model's class is scored on"
        )
    return found


def smoothest_metric(measured: Iterable[str]) -> str:
    """The metric to predict damage from: a perplexity (mean NLL), else the loss, else the primary one (top-1
    moves in whole images)."""
    measured = set(measured)
    smooth = [m for m in METRICS if METRICS[m].damage == "ratio"] + ["loss"]
    return next((m for m in smooth if m in measured), None) or primary_metric(measured)
