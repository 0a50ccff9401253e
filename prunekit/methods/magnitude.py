"""Magnitude pruning (Han et al. 2015): importance = |W|. Compared per layer by default."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..collect import LayerStats
from .base import Criterion, register_method


@register_method
@dataclass
class Magnitude(Criterion):
    """Mask by ``|W|`` alone: no calibration data."""

    name = "magnitude"
    default_group = "per-layer"

    def score(self, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        return weight.abs()
