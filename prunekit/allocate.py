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
import logging
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
