"""Per-layer sparsity targets between scoring and masking: uniform, or from a registry of allocators.

An allocator gets the selected layers, the target mean sparsity, each layer's block index (None outside
blocks) and a callable that returns dense-model input statistics (norms) of every selected layer; it
calls that only if it needs them, since it costs one extra calibration pass. The mean sparsity,
weighted by parameter count, must stay the target.

* ``uniform``: every layer at the target (the published default);
* ``owl``: Outlier-Weighed Layerwise sparsity (Yin et al. 2024): blocks whose Wanda scores hold more
  outliers are pruned less;
* ``explicit``: per-layer / per-block sparsities from a recipe.

Allocation works on units: a block (decoder layer, ViT block) shares one sparsity; a selected layer
outside the blocks is a unit of its own.
"""

from __future__ import annotations

import fnmatch
import heapq
import logging
import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .collect import LayerStats, column_norms_for_rows
from .errors import PrunekitError
from .graph import weight_matrix
from .groups import check_sparsity
from .methods.wanda import wanda_score
from .metrics import damage, dense_value, smoothest_metric
from .registry import Registry

log = logging.getLogger(__name__)

DenseStats = Callable[[], Mapping[str, LayerStats]]


@dataclass
class Allocator:
    name: ClassVar[str] = ""
    # Whether ``plan`` calls ``dense_stats`` (one calibration pass over the dense model): an allocator that
    # does not (uniform, explicit) works without calibration data, e.g. with magnitude pruning.
    needs_calibration: ClassVar[bool] = False

    def plan(
        self,
        layers: Mapping[str, nn.Module],
        sparsity: float,
        block_of: Mapping[str, int | None],
        dense_stats: DenseStats,
    ) -> dict[str, float]:
        raise NotImplementedError


ALLOCATORS: Registry[Allocator] = Registry("allocation")
register_allocator = ALLOCATORS.register
register_allocation = register_allocator
create_allocator = ALLOCATORS.create


@register_allocator
@dataclass
class Uniform(Allocator):
    """Every layer gets the same sparsity (the published default)."""

    name = "uniform"

    def plan(self, layers, sparsity, block_of, dense_stats):
        return {n: sparsity for n in layers}


# ---------------------------------------------------------------- units and the weighted mean

MAX_SPARSITY = 0.99  # a unit is never pruned completely (the published OWL code floors density at 1%)


def units(layers: Mapping[str, nn.Module], block_of: Mapping[str, int | None]) -> dict[Hashable, list[str]]:
    """Layer names per unit: the block index, or the layer's own name when it is outside the blocks."""
    out: dict[Hashable, list[str]] = {}
    for name in layers:
        out.setdefault(name if block_of.get(name) is None else block_of[name], []).append(name)
    return out


def unit_params(layers: Mapping[str, nn.Module], groups: Mapping[Hashable, list[str]]) -> dict[Hashable, int]:
    return {u: sum(layers[n].weight.numel() for n in names) for u, names in groups.items()}


def weighted_mean(values: Mapping[Hashable, float], weights: Mapping[Hashable, int]) -> float:
    return sum(values[k] * weights[k] for k in values) / sum(weights[k] for k in values)


def rebalance(
    values: Mapping[Hashable, float],
    weights: Mapping[Hashable, int],
    target: float,
    low: float = 0.0,
    high: float = MAX_SPARSITY,
) -> dict[Hashable, float]:
    """Clip ``values`` into ``[low, high]`` and shift the unclipped ones by one amount so that the
    ``weights``-weighted mean is ``target`` again (each round pins at least one more unit)."""
    vals = dict(values)
    for _ in range(len(vals) + 1):
        vals = {k: min(max(v, low), high) for k, v in vals.items()}
        gap = target - weighted_mean(vals, weights)
        free = [k for k, v in vals.items() if (v < high if gap > 0 else v > low)]
        if abs(gap) < 1e-12 or not free:
            break
        shift = gap * sum(weights[k] for k in vals) / sum(weights[k] for k in free)
        vals.update({k: vals[k] + shift for k in free})
    if abs(target - weighted_mean(vals, weights)) > 1e-9:
        raise PrunekitError(f"cannot reach a mean sparsity of {target} with every unit in [{low}, {high}]")
    return vals


def spread_to_layers(per_unit: Mapping[Hashable, float], groups: Mapping[Hashable, list[str]]) -> dict[str, float]:
    return {n: per_unit[u] for u, names in groups.items() for n in names}


# ---------------------------------------------------------------- OWL


def wanda_scores(module: nn.Module, stats: LayerStats) -> torch.Tensor:
    """``|W_ij| * ||X_j||`` of one layer (conv groups broadcast to their rows)."""
    weight = weight_matrix(module).detach().float()
    return wanda_score(weight, column_norms_for_rows(stats, weight.shape[0]).to(weight.device))


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of the unit's scores above ``m`` times their mean (OWL's layerwise outlier distribution)."""
    mean = sum(s.double().sum().item() for s in scores) / sum(s.numel() for s in scores)
    return sum(int((s > m * mean).sum()) for s in scores) / sum(s.numel() for s in scores)


def owl_sparsities(
    ratios: Mapping[Hashable, float], params: Mapping[Hashable, int], target: float, lam: float
) -> dict[Hashable, float]:
    """OWL's rule: outlier ratios rescaled to ``[0, 2 lam]`` and subtracted from the target around their
    (parameter-weighted) mean, so sparsities span ``2 lam`` with the most outliers pruned least; with
    equal-size blocks this is exactly the published code (the mean, not the midpoint, sits at the target)."""
    low, high = min(ratios.values()), max(ratios.values())
    if high - low <= 0:
        return {u: target for u in ratios}
    spread = {u: (r - low) / (high - low) * 2 * lam for u, r in ratios.items()}
    centre = weighted_mean(spread, params)
    return rebalance({u: target - (d - centre) for u, d in spread.items()}, params, target)


@register_allocator
@dataclass
class OWL(Allocator):
    """Outlier-Weighed Layerwise sparsity (Yin et al. 2024). ``m``: outlier threshold in multiples of the
    block's mean Wanda score (5 as published); ``lam``: the largest change from the target (0.08)."""

    name = "owl"
    needs_calibration = True
    m: float = 5.0
    lam: float = 0.08

    def __post_init__(self):
        if self.m <= 0 or not 0 <= self.lam < 1:
            raise PrunekitError(f"owl needs m > 0 and 0 <= lam < 1, got m={self.m}, lam={self.lam}")

    def plan(self, layers, sparsity, block_of, dense_stats):
        groups = units(layers, block_of)
        stats = dense_stats()
        ratios = {
            u: outlier_ratio([wanda_scores(layers[n], stats[n]) for n in names], self.m) for u, names in groups.items()
        }
        per_unit = owl_sparsities(ratios, unit_params(layers, groups), sparsity, self.lam)
        log.info("owl: outlier ratios %s -> sparsities %s", _rounded(ratios), _rounded(per_unit))
        return spread_to_layers(per_unit, groups)


def _rounded(values: Mapping[Hashable, float]) -> dict:
    return {k: round(v, 4) for k, v in values.items()}


# ---------------------------------------------------------------- explicit (from a recipe)


@register_allocator
@dataclass
class Explicit(Allocator):
    """Per-layer sparsities written out in a recipe.

    ``sparsities`` maps fnmatch patterns on layer names
    (``"model.layers.*.mlp.*"``) or block indices (``3`` / ``"3"``) to a sparsity; the first key that
    matches a layer wins, every layer must match one (end with ``"*"`` as a catch-all). The
    parameter-weighted mean must be the target (within 1e-6) unless ``normalize`` scales all of them."""

    name = "explicit"
    sparsities: dict = field(default_factory=dict)
    normalize: bool = False

    def __post_init__(self):
        if not self.sparsities:
            raise PrunekitError("explicit allocation needs sparsities: {pattern or block index: sparsity, ...}")
        for value in self.sparsities.values():
            check_sparsity(value)

    def plan(self, layers, sparsity, block_of, dense_stats):
        chosen = {n: self._lookup(n, block_of.get(n)) for n in layers}
        params = {n: m.weight.numel() for n, m in layers.items()}
        mean = weighted_mean(chosen, params)
        if abs(mean - sparsity) <= 1e-6:
            return chosen
        if not self.normalize:
            raise PrunekitError(
                f"explicit sparsities average {mean:.6f} (weighted by parameters), not the target "
                f"{sparsity}; change them, or set normalize: true to rescale them to the target"
            )
        return _rescaled(chosen, sparsity / mean if mean > 0 else float("inf"))

    def _lookup(self, name: str, block: int | None) -> float:
        for key, value in self.sparsities.items():
            if _key_matches(key, name, block):
                return float(value)
        raise PrunekitError(
            f"layer {name!r} matches no key of the explicit sparsities {list(self.sparsities)}; "
            "add a pattern for it (a final '*' catches every other layer)"
        )


def _key_matches(key, name: str, block: int | None) -> bool:
    if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
        return block is not None and int(key) == block
    return fnmatch.fnmatchcase(name, str(key))


def _rescaled(chosen: dict[str, float], factor: float) -> dict[str, float]:
    scaled = {n: v * factor for n, v in chosen.items()}
    if any(not 0 <= v < 1 for v in scaled.values()):
        raise PrunekitError(
            "normalize would push some explicit sparsities outside [0, 1); give sparsities whose "
            "weighted mean is nearer the target"
        )
    return scaled


# ---------------------------------------------------------------- from a sensitivity scan

GRID = 0.005  # the budget is spent in steps of half a percent of a part, then matched exactly


def damage_curve(sparsities: list[float], damages: list[float], floor: float) -> Callable[[float], float]:
    """A part's predicted damage at any sparsity from its scan: log-linear between the measured points (damage
    grows about exponentially with sparsity), the last segment's growth beyond them, quadratic from the dense
    model up to the first; measured damages below ``floor`` (noise) count as ``floor``."""
    points = sorted(zip(sparsities, damages))
    s = [p[0] for p in points]
    logs = [math.log(max(d, floor)) for _, d in points]
    slope = (logs[-1] - logs[-2]) / (s[-1] - s[-2]) if len(s) > 1 else 0.0

    def predicted(x: float) -> float:
        if x <= s[0]:
            return math.exp(logs[0]) * (x / s[0]) ** 2 if s[0] > 0 else math.exp(logs[0])
        if x >= s[-1]:
            return math.exp(logs[-1] + max(slope, 0.0) * (x - s[-1]))
        i = next(k for k in range(1, len(s)) if x <= s[k])
        t = (x - s[i - 1]) / (s[i] - s[i - 1])
        return math.exp(logs[i - 1] + t * (logs[i] - logs[i - 1]))

    return predicted


def least_damage(
    params: list[int], curves: list[Callable[[float], float]], target: float, lam: float = 1.0
) -> list[float]:
    """Per-part sparsities in ``target +- lam`` whose parameter-weighted mean is ``target`` and whose summed predicted
    damage is least: every part starts at the lower end, and the rest of the budget goes, ``GRID`` of a part at a
    time, to the step that costs the least damage per weight removed (optimal when the curves are convex); the last
    step is trimmed so the mean is exact."""
    check_sparsity(target)
    low, high = max(target - lam, 0.0), min(target + lam, MAX_SPARSITY)
    levels = [low] * len(params)
    budget, spent = target * sum(params), low * sum(params)

    def step_cost(i: int) -> float:
        nxt = min(levels[i] + GRID, high)
        return (curves[i](nxt) - curves[i](levels[i])) / (params[i] * (nxt - levels[i]))

    heap = [(step_cost(i), i) for i in range(len(params)) if params[i] > 0]
    heapq.heapify(heap)
    while heap and spent < budget - 1e-9:
        _, i = heapq.heappop(heap)
        grow = min(GRID, high - levels[i], (budget - spent) / params[i])
        levels[i] += grow
        spent += grow * params[i]
        if levels[i] < high - 1e-12:
            heapq.heappush(heap, (step_cost(i), i))
    if spent < budget - 1e-6 * max(budget, 1):
        raise PrunekitError(f"cannot reach a mean sparsity of {target} with every part at most {high}")
    return levels


def _layer_parts(layers: Mapping[str, nn.Module], parts: list[dict]) -> list[list[str]]:
    """The selected layers of each scanned part; the selection must be the scan's."""
    scanned = {n for p in parts for n in p["layers"]}
    if scanned != set(layers):
        missing, extra = sorted(set(layers) - scanned), sorted(scanned - set(layers))
        raise PrunekitError(
            f"the sensitivity scan covers other layers than those selected (not scanned: {missing[:3]}, scanned but "
            f"not selected: {extra[:3]}); scan with the same --include/--exclude/--layer-types"
        )
    return [list(p["layers"]) for p in parts]


SCAN_FORMAT = "prunekit-sensitivity"  # ``kind`` of a scan's JSON (``prunekit.sensitivity.Scan``)


def scan_damages(scan: Mapping, metric: str | None = None) -> list[list[float]]:
    """Per scanned part and sparsity, how much worse than dense ``metric`` (default: the smoothest measured) is."""
    results = scan["results"]
    name = metric or smoothest_metric(results[0][0] if results and results[0] else scan["dense"])
    dense = dense_value(name, scan["dense"])
    return [[damage(name, row[name], dense) for row in rows] for rows in results]


def scan_allocation(
    scan: Mapping, params: list[int], target: float, metric: str | None = None, lam: float = 0.08
) -> list[float]:
    """Per-part sparsities meeting ``target`` from a scan's JSON (``prunekit.sensitivity.Scan.to_dict``)."""
    damages = scan_damages(scan, metric)
    scale = max((d for row in damages for d in row if math.isfinite(d)), default=0.0)
    floor = max(scale, 1e-9) * 1e-3
    curves = [damage_curve(list(scan["sparsities"]), row, floor) for row in damages]
    return least_damage(params, curves, target, lam)


def read_scan(path: str) -> dict:
    """A sensitivity scan's JSON (``sensitivity.json``), checked to be one."""
    import json
    from pathlib import Path

    file = Path(path).expanduser()
    if not file.is_file():
        raise PrunekitError(f"sensitivity scan {path!r} does not exist; run `prunekit sensitivity ... --out DIR` first")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise PrunekitError(f"sensitivity scan {path!r} is not JSON; give the sensitivity.json a scan wrote") from None
    if not isinstance(data, dict) or data.get("kind") != SCAN_FORMAT:
        raise PrunekitError(f"{path!r} is not a sensitivity scan; give the sensitivity.json a scan wrote")
    return data


@register_allocator
@dataclass
class Sensitivity(Allocator):
    """Per-part sparsities from a sensitivity scan (``prunekit sensitivity``): the global budget spent where the scan
    predicts the least damage to the metric. ``scan``: its sensitivity.json; ``metric``: the measured metric to read
    (default: a perplexity, else the loss, else the scan's own); ``lam``: the largest change from the target (as
    OWL's): the scan prunes each part alone, and the damages of parts pruned together add up only near the target
    (on kjv-llama-5m the first block alone at 70% hurts more than all four blocks at 70%)."""

    name = "sensitivity"
    scan: str = ""
    metric: str | None = None
    lam: float = 0.08

    def __post_init__(self):
        if not 0 <= self.lam < 1:
            raise PrunekitError(f"sensitivity allocation needs 0 <= lam < 1, got lam={self.lam}")
        if not self.scan:
            raise PrunekitError("allocation sensitivity needs scan=PATH (a scan's sensitivity.json)")
        data = read_scan(self.scan)
        measured = set(data["results"][0][0]) if data["results"] and data["results"][0] else set()
        if self.metric is not None and self.metric not in measured:
            raise PrunekitError(f"the scan {self.scan!r} measured {sorted(measured)}, not {self.metric!r}")
        self._data = data

    def plan(self, layers, sparsity, block_of, dense_stats):
        groups = _layer_parts(layers, self._data["parts"])
        params = [sum(weight_matrix(layers[n]).numel() for n in names) for names in groups]
        per_part = scan_allocation(self._data, params, sparsity, self.metric, self.lam)
        log.info("sensitivity allocation: %s", [round(s, 4) for s in per_part])
        return {n: s for names, s in zip(groups, per_part) for n in names}
