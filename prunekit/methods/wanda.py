"""Wanda (Sun et al. 2023): importance = |W_ij| * ||X_j||_2, one forward pass, no weight update.

Compared per output row by default, as published for LLMs (per-layer is better for ConvNeXt/ViT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..collect import LayerStats
from .base import NORMS, Criterion, register_method


@register_method
@dataclass
class Wanda(Criterion):
    """Mask by ``|W| * ||X||`` (weight times input-column norm), one calibration pass, no weight update."""

    name = "wanda"
    needs = frozenset({NORMS})

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        return wanda_score(weight, stats.norms())


def wanda_score(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||``: ``norms`` are the input columns' L2 norms, ``[cols]``, ``[1, cols]`` or one row
    per weight row (conv groups); the one Wanda score that OWL, DSnoT and width pruning use too."""
    scores = weight.abs()
    fits = torch.broadcast_shapes(scores.shape, norms.shape) == scores.shape
    if fits and scores.dtype == torch.result_type(scores, norms):
        return scores.mul_(norms)  # one [rows, cols] allocation, not two: half the time on a 7B-sized layer
    return scores * norms
