"""DSnoT, training-free mask refinement (Zhang et al. 2023, "Dynamic Sparse No Training").

After a criterion (Wanda, magnitude, RIA) has chosen the mask, each output row swaps pruned and kept
weights to shrink the row's *expected* reconstruction error, the mean output the pruned weights took
away:

    e_i = sum_{j pruned} W_ij * m_j,    m_j = (sum of input column j) / nsamples

(``m_j`` is the column mean times the tokens per sample, the published scale, so the default
``threshold`` means what it does there). One swap per row and cycle, all rows in parallel:

* regrow the pruned weight that moves ``e_i`` most towards 0 per unit of input variance
  (largest ``W_ij m_j / var_j ** var_power`` with the sign of ``e_i``);
* prune in exchange the least Wanda-important kept weight whose ``W_ij m_j`` has the opposite sign
  (unstructured), or the least Wanda-important original kept weight of the same M-block (N:M, so
  every M-block keeps exactly its count);
* a row stops at its first swap that would not make ``|e_i|`` smaller (or, with ``same_sign``, would
  flip its sign, as in the paper), once ``|e_i| <= threshold``, or after ``max_cycles``.

So ``|e_i|`` never grows and every row (every M-block) keeps its number of weights. Differences from the
published code: its default skips the check on ``|e_i|`` (a ``type=bool`` flag that is always true) and
so can overshoot; its variance averages per-sequence variances where this uses the variance over all
tokens; it skips MLP layers by default (here: choose the layers with include/exclude). The weights are
not changed, only the mask: use it after criteria that do not update weights (not after SparseGPT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..collect import LayerStats
from ..errors import PrunekitError
from .base import NORMS, Target, Update, register_update
from .wanda import wanda_score

_EPS = 1e-12


def column_sums_per_sample(stats: LayerStats) -> torch.Tensor:
    """``sum_t x_tj / nsamples``, ``[1, cols]``: DSnoT's expected-input vector."""
    if stats.col_sum is None:
        raise PrunekitError(
            "DSnoT needs the column sums of each layer's input (LayerStats.col_sum); collect the "
            "statistics with prunekit.collect.collect, which accumulates them"
        )
    return stats.col_sum / max(stats.nsamples, 1)


def column_variance(stats: LayerStats) -> torch.Tensor:
    """Variance of each input column over all calibration tokens, ``[1, cols]``."""
    n = max(stats.ntokens, 1)
    mean = stats.col_sum / n
    return (stats.sq_sum / n - mean.square()).clamp_min(_EPS)


def expected_error(drift: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row: the expected output the pruned weights took away, ``sum_{pruned} W_ij m_j``."""
    return (drift * ~mask).sum(dim=1)


@dataclass
class _Queue:
    """Column indices of each row sorted by a key, read from either end (rows hold different counts)."""

    order: torch.Tensor  # [rows, cols]
    front: torch.Tensor  # [rows] next index from the start
    back: torch.Tensor  # [rows] next index from the end (members only)

    @classmethod
    def of(cls, key: torch.Tensor, member: torch.Tensor) -> _Queue:
        order = torch.sort(torch.where(member, key, math.inf), dim=1, stable=True).indices
        return cls(order, torch.zeros(key.shape[0], dtype=torch.long, device=key.device), member.sum(dim=1) - 1)

    def peek(self, from_back: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.where(from_back, self.back, self.front).clamp(0, self.order.shape[1] - 1)
        return self.order.gather(1, pos[:, None])[:, 0], self.front <= self.back

    def pop(self, from_back: torch.Tensor, taken: torch.Tensor) -> None:
        self.back -= (from_back & taken).long()
        self.front += (~from_back & taken).long()


class _RowPartner:
    """Unstructured: prune the least Wanda-important kept weight whose drift opposes the error."""

    def __init__(self, drift: torch.Tensor, wanda: torch.Tensor, mask: torch.Tensor):
        self.negative = _Queue.of(wanda, mask & (drift < 0))
        self.positive = _Queue.of(wanda, mask & (drift >= 0))

    def peek(self, regrow: torch.Tensor, up: torch.Tensor, mask: torch.Tensor):
        neg_idx, neg_ok = self.negative.peek(torch.zeros_like(up))
        pos_idx, pos_ok = self.positive.peek(torch.zeros_like(up))
        return torch.where(up, neg_idx, pos_idx), torch.where(up, neg_ok, pos_ok)

    def pop(self, up: torch.Tensor, taken: torch.Tensor) -> None:
        self.negative.pop(torch.zeros_like(up), taken & up)
        self.positive.pop(torch.zeros_like(up), taken & ~up)


class _BlockPartner:
    """N:M: prune the least Wanda-important originally kept weight of the regrown weight's M-block."""

    def __init__(self, wanda: torch.Tensor, mask: torch.Tensor, m: int):
        self.wanda, self.original, self.m = wanda, mask.clone(), m

    def peek(self, regrow: torch.Tensor, up: torch.Tensor, mask: torch.Tensor):
        block = (regrow - regrow % self.m)[:, None] + torch.arange(self.m, device=regrow.device)
        candidate = (mask & self.original).gather(1, block)
        value = torch.where(candidate, self.wanda.gather(1, block), math.inf)
        best = value.argmin(dim=1, keepdim=True)
        return block.gather(1, best)[:, 0], candidate.any(dim=1)

    def pop(self, up: torch.Tensor, taken: torch.Tensor) -> None:
        pass  # the mask itself records what was swapped out


@register_update
@dataclass
class DSnoT(Update):
    """Refine any mask without training: swap pruned and kept weights that cut the layer's output error.

    Hyper-parameters as published: 50 cycles, threshold 0.1, regrowing divided by variance ** 1."""

    name = "dsnot"
    needs = frozenset({NORMS})
    max_cycles: int = 50
    threshold: float = 0.1
    var_power: float = 1.0
    same_sign: bool = True

    def update(
        self, weight: torch.Tensor, mask: torch.Tensor, stats: LayerStats, target: Target
    ) -> tuple[torch.Tensor, torch.Tensor]:
        drift = weight * column_sums_per_sample(stats)
        wanda = wanda_score(weight, stats.norms())
        regrow = _Queue.of(drift / column_variance(stats).pow(self.var_power), ~mask)
        partner = _RowPartner(drift, wanda, mask) if target.nm is None else _BlockPartner(wanda, mask, target.nm[1])
        return weight, self._refine(drift, mask.clone(), regrow, partner)

    def _refine(self, drift, mask, regrow: _Queue, partner) -> torch.Tensor:
        rows = torch.arange(mask.shape[0], device=mask.device)
        error, active = expected_error(drift, mask), torch.ones_like(rows, dtype=torch.bool)
        for _ in range(self.max_cycles):
            up = error > 0
            r_idx, r_ok = regrow.peek(from_back=up)
            p_idx, p_ok = partner.peek(r_idx, up, mask)
            new_error = error + drift[rows, p_idx] - drift[rows, r_idx]
            active = active & r_ok & p_ok & self._accept(error, new_error)
            mask[rows[active], r_idx[active]] = True
            mask[rows[active], p_idx[active]] = False
            error = torch.where(active, new_error, error)
            regrow.pop(up, active)
            partner.pop(up, active)
            if not active.any():
                break
        return mask

    def _accept(self, error: torch.Tensor, new_error: torch.Tensor) -> torch.Tensor:
        ok = (error.abs() > self.threshold) & (new_error.abs() < error.abs())
        return ok & (error * new_error >= 0) if self.same_sign else ok
