"""Wanda (Sun et al. 2023): importance = |W_ij| * ||X_j||_2, one forward pass, no weight update.

Compared per output row by default, as published for LLMs (per-layer is better for ConvNeXt/ViT).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..collect import LayerStats
from .base import NORMS, Method, register_method


@register_method
@dataclass
class Wanda(Method):
    name = "wanda"
    needs = frozenset({NORMS})

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        return weight.abs() * stats.norms()
