"""RIA, relative importance and activations (Zhang et al. 2024, "Plug-and-Play"):

    score_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * ||X_j||_2 ** a

A weight counts for how much of its input column and of its output row it carries, so a layer does not
strip a whole input channel or output neuron just because its weights there are small. Compared per
layer by default, as in the published code (``--per_outneuron`` off); the optional channel permutation
for N:M is not implemented (plain N:M selection on the scores).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..collect import LayerStats
from .base import NORMS, Criterion, register_method

_EPS = 1e-12  # an all-zero row or column gets relative importance 0 instead of 0/0


def relative_importance(weight: torch.Tensor) -> torch.Tensor:
    """``|W| / column sums + |W| / row sums`` of ``|W|`` (the RI part of RIA)."""
    a = weight.abs()
    return a / a.sum(dim=0, keepdim=True).clamp_min(_EPS) + a / a.sum(dim=1, keepdim=True).clamp_min(_EPS)


@register_method
@dataclass
class RIA(Criterion):
    """Mask by relative importance (a weight's share of its row and column) times ``||X||^a``.

    ``a`` is the exponent on the input-column norms (0.5 in the paper; 0 gives plain RI)."""

    name = "ria"
    needs = frozenset({NORMS})
    default_group = "per-layer"
    a: float = 0.5

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        return relative_importance(weight) * stats.norms().pow(self.a)
