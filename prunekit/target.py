"""Quality targets: the bound (``ppl<=+10%``) and the search for the highest sparsity whose pruned model meets it.

A bound is ``METRIC OP VALUE``: ``OP`` is ``<=``/``<`` for metrics where lower is better (perplexities, loss) and
``>=``/``>`` where higher is better (top-1, accuracy, agreement); an unsigned ``VALUE`` is absolute (``ppl<=60``,
``top1>=0.98``), a signed one is relative to the dense model: ``+10%``/``-1%`` multiply it, ``+5``/``-0.01`` add
to it. The search (``Search``) is pure bookkeeping over measured points, so it is tested on synthetic curves: it
brackets the answer (the first trial, then halfway to the highest sparsity while trials meet the bound), then
interpolates the measured damage curve inside the bracket, on the grid of ``step``, until the highest sparsity that
meets the bound and the lowest that misses it are one step apart. No torch here: a recipe checks its bound when
it is made.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from .errors import PrunekitError
from .metrics import damage, metric

# ---------------------------------------------------------------- the bound

BOUND = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|>=|<|>)\s*([+-]?)\s*(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?\s*(%?)\s*$")


@dataclass(frozen=True)
class Bound:
    """``metric op value``; ``relative``: ``""`` (absolute), ``"percent"`` (dense x (1 + value/100)) or ``"offset"``
    (dense + value); ``value`` carries the sign."""

    text: str
    metric: str
    op: str
    value: float
    relative: str = ""

    def threshold(self, dense: float | None) -> float:
        """The metric's limit for a model whose dense value is ``dense``."""
        if not self.relative:
            return self.value
        if dense is None:
            raise PrunekitError(f"--target {self.text!r} is relative to the dense {self.metric}, which is unknown")
        return dense * (1 + self.value / 100) if self.relative == "percent" else dense + self.value

    def met(self, value: float | None, dense: float | None) -> bool:
        if value is None or math.isnan(value):
            return False
        limit = self.threshold(dense)
        return {"<=": value <= limit, "<": value < limit, ">=": value >= limit, ">": value > limit}[self.op]


def parse_bound(text: str) -> Bound:
    """``"ppl<=+10%"`` -> ``Bound``; every mistake is one line naming the fix."""
    match = BOUND.match(str(text))
    if not match:
        raise PrunekitError(
            f"--target {text!r} is not METRIC OP VALUE; write e.g. 'ppl<=+10%' (relative to dense), 'ppl<=60' or "
            "'top1>=0.98'"
        )
    name, op, sign, number, exponent, percent = match.groups()
    m = metric(name)
    if m.higher_is_better != (op in (">=", ">")):
        better = "higher" if m.higher_is_better else "lower"
        want = ">=" if m.higher_is_better else "<="
        raise PrunekitError(
            f"--target {text!r}: {name} is better {better}, so a target keeps it {want} a value ('{name}{want}...')"
        )
    if percent and not sign:
        raise PrunekitError(
            f"--target {text!r}: a percentage is relative to the dense model and needs a sign ('+10%', '-1%'); "
            "an absolute value has no '%' (top1>=0.98)"
        )
    value = float(number + (f"e{exponent}" if exponent else "")) * (-1 if sign == "-" else 1)
    relative = "percent" if percent else ("offset" if sign else "")
    return Bound(str(text).strip(), name, op, value, relative)


# ---------------------------------------------------------------- the search

HIGHEST = 0.99  # unstructured: never every weight of a layer
STEP = 0.01  # the search stops when passing and failing sparsities are this close


@dataclass
class Trial:
    """One prune + evaluation: the sparsity tried, every metric measured, and whether the bound was met."""

    sparsity: float
    metrics: dict[str, float]
    met: bool
    seconds: float = 0.0
    error: str | None = None  # the trial could not prune that far (structured methods): a miss


@dataclass
class Search:
    """The highest sparsity in ``[step, highest]`` whose model meets ``bound``, in at most ``max_trials`` trials.

    ``propose()`` gives the next sparsity to try (None: done), ``record()`` takes what it measured. The dense model
    is the point at sparsity 0, so a bound it misses is refused before any trial (``check_dense``)."""

    bound: Bound
    dense: float
    first: float = 0.5
    highest: float = HIGHEST
    step: float = STEP
    max_trials: int = 8
    trials: list[Trial] = field(default_factory=list)
    _moved: list[str] = field(default_factory=list)  # which end of the bracket each trial moved

    def check_dense(self) -> None:
        if not self.bound.met(self.dense, self.dense):
            raise PrunekitError(
                f"the dense model already misses --target {self.bound.text!r}: {self.bound.metric} "
                f"{self.dense:.4g} (limit {self.bound.threshold(self.dense):.4g}); nothing was pruned: loosen it"
            )

    @property
    def best(self) -> Trial | None:
        """The trial with the highest sparsity that met the bound."""
        return max((t for t in self.trials if t.met), key=lambda t: t.sparsity, default=None)

    def bracket(self) -> tuple[float, float | None]:
        """The highest sparsity known to meet the bound (0: the dense model) and the lowest above it known to miss."""
        low = self.best.sparsity if self.best is not None else 0.0
        misses = [t.sparsity for t in self.trials if not t.met and t.sparsity > low]
        return low, min(misses, default=None)

    def propose(self) -> float | None:
        if len(self.trials) >= self.max_trials:
            return None
        low, high = self.bracket()
        if high is None:
            if low >= self.highest - 1e-9:
                return None
            guess = self.first if not self.trials else low + (self.highest - low) / 2
            return self._on_grid(guess, low, self.highest + self.step)
        if high - low <= self.step + 1e-9:
            return None
        guess = self._interpolate(low, high)
        if len(self._moved) >= 2 and self._moved[-1] == self._moved[-2]:
            guess = (low + high) / 2  # the same end moved twice: interpolation is creeping, halve instead
        return self._on_grid(guess, low, high)

    def record(self, sparsity: float, metrics: Mapping[str, float], seconds: float = 0.0, error: str | None = None):
        """Take one trial's measurements; returns it."""
        low, high = self.bracket()
        value = metrics.get(self.bound.metric)
        trial = Trial(sparsity, dict(metrics), error is None and self.bound.met(value, self.dense), seconds, error)
        self.trials.append(trial)
        if low < sparsity and (high is None or sparsity < high):
            self._moved.append("low" if trial.met else "high")
        return trial

    def _on_grid(self, guess: float, low: float, high: float) -> float:
        """``guess`` rounded to the step grid, at least one step inside ``(low, high)``."""
        snapped = round(round(guess / self.step) * self.step, 6)
        return round(min(max(snapped, low + self.step), high - self.step, self.highest), 6)

    def _damage(self, sparsity: float) -> float:
        if sparsity == 0.0:
            return 0.0
        trial = next(t for t in reversed(self.trials) if t.sparsity == sparsity)
        value = trial.metrics.get(self.bound.metric)
        return math.inf if trial.error or value is None else damage(self.bound.metric, value, self.dense)

    def _interpolate(self, low: float, high: float) -> float:
        """Where the damage curve crosses the bound's damage between the bracket's ends, linear in log damage
        (pruning damage grows about exponentially with sparsity); the midpoint while an end shows no damage (the
        dense model, or a top-1 within noise), where a straight line would be far too low."""
        goal = damage(self.bound.metric, self.bound.threshold(self.dense), self.dense)
        d_low, d_high = self._damage(low), self._damage(high)
        if not (0 < d_low < d_high < math.inf and goal > 0):
            return (low + high) / 2
        where = (math.log(goal) - math.log(d_low)) / (math.log(d_high) - math.log(d_low))
        return low + (high - low) * min(max(where, 0.0), 1.0)

    def to_dict(self) -> dict:
        best = self.best
        return {
            "target": self.bound.text,
            "metric": self.bound.metric,
            "dense": self.dense,
            "threshold": self.bound.threshold(self.dense),
            "chosen": best.sparsity if best else None,
            "step": self.step,
            "max_trials": self.max_trials,
            "trials": [asdict(t) for t in self.trials],
        }
