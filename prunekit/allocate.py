"""Per-layer sparsity targets between scoring and masking: uniform, or from a registry of allocators.

An allocator gets the selected layers, the target mean sparsity, each layer's block index (None outside
blocks) and a callable that returns dense-model input statistics (norms) of every selected layer; it
calls that only if it needs them, since it costs one extra calibration pass. The mean sparsity,
weighted by parameter count, must stay the target.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .collect import LayerStats
from .registry import Registry

DenseStats = Callable[[], Mapping[str, LayerStats]]


@dataclass
class Allocator:
    name: ClassVar[str] = ""

    def plan(self, layers: Mapping[str, nn.Module], sparsity: float, block_of: Mapping[str, int | None],
             dense_stats: DenseStats) -> dict[str, float]:
        raise NotImplementedError


ALLOCATORS: Registry[Allocator] = Registry("allocation")
register_allocator = ALLOCATORS.register
create_allocator = ALLOCATORS.create


@register_allocator
@dataclass
class Uniform(Allocator):
    """Every layer gets the same sparsity (the published default)."""

    name = "uniform"

    def plan(self, layers, sparsity, block_of, dense_stats):
        return {n: sparsity for n in layers}
