"""ADMM weight update (Boža 2024, "Fast and Optimal Weight Update for Pruned Large Language Models").

Problem per matmul: keep the mask, re-fit the kept weights to minimise ``||W X - W_hat X||^2``. ADMM
splits it into a ridge-like least-squares step and a projection onto the mask:

    W <- (W0 A + rho (Z - U)) (A + rho I)^-1      (A = X^T X, one factorisation for all iterations)
    Z <- (W + U) * mask                           (projection: zero the pruned weights)
    U <- U + W - Z                                (scaled dual variable)

As in the published code the problem is preconditioned by the input norms ``s_j = ||X_j||``: with
``W~ = W * s`` and ``A~ = A / (s s^T)`` (unit diagonal), ``rho`` means the same for every layer and
``|W~|`` is the Wanda score. ``A~`` also gets ``percdamp`` x mean(diag A~) on its diagonal, a ridge term
that keeps the fit near the dense weights: the published code uses 0.1; we default to 0.01, which on
kjv-llama-5m gave lower perplexity at 70% and 80% (benchmarks/results/kjv_weight_update.md) and keeps the
fit within 1% of plain least squares. ``rho`` is fixed (1.0), as in the published code. The result is
``Z / s``, exactly sparse.

Two entry points: ``admm`` (an ``Update``: any mask criterion x ADMM re-fit) and ``admm-gradual`` (a
solver: during the first ``steps`` iterations the mask is re-chosen by Wanda scores of the current
``W~ + U`` at a sparsity raised on the cubic schedule ``s_t = s (1 - (1 - t/steps)^3)``, then the last
``iterations - steps`` iterations refine the weights with the mask fixed; ``steps=0`` is the Wanda mask
plus the ``admm`` update).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..collect import LayerStats
from ..errors import PrunekitError
from ..groups import select_mask
from ..selection import select_nm
from ._linalg import add_to_diagonal, gram, spd_inverse
from .base import HESSIAN, Solver, Target, Update, register_method, register_update


@dataclass
class Problem:
    """The preconditioned least-squares problem of one matmul, factorised once."""

    weight: torch.Tensor  # W0 * s, [rows, cols]
    rhs: torch.Tensor  # W0~ A~ (A~ damped), the constant part of the W step
    inverse: torch.Tensor  # (A~ + rho I)^-1
    scale: torch.Tensor  # s = ||X_j|| up to a constant (1 where an input was always zero), [cols]
    alive: torch.Tensor  # inputs that were ever non-zero, [cols] bool
    rho: float


def make_problem(weight: torch.Tensor, gram_matrix: torch.Tensor, rho: float, percdamp: float) -> Problem:
    """Precondition ``A = X^T X`` to unit diagonal, damp it, and factorise ``A~ + rho I`` once."""
    diag = gram_matrix.diagonal()
    alive = diag > 0
    scale = torch.where(alive, diag.clamp_min(0).sqrt(), torch.ones_like(diag))
    a = gram_matrix / scale.unsqueeze(0) / scale.unsqueeze(1)
    a = add_to_diagonal(a, percdamp * a.diagonal().mean())
    w = weight.float() * scale
    inverse = spd_inverse(add_to_diagonal(a, rho), what="the ADMM system X^T X + rho I")
    return Problem(w, w @ a, inverse, scale, alive, rho)


def admm_iteration(
    w: torch.Tensor, u: torch.Tensor, mask: torch.Tensor, p: Problem
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ADMM round (projection, dual step, least-squares step) in the preconditioned space."""
    z = (w + u) * mask
    u = u + w - z
    w = (p.rhs + p.rho * (z - u)) @ p.inverse
    return w, u


def admm_result(w: torch.Tensor, u: torch.Tensor, mask: torch.Tensor, p: Problem) -> torch.Tensor:
    """The final projection, back in the layer's own units."""
    return (w + u) * mask / p.scale


def admm_update(
    weight: torch.Tensor,
    mask: torch.Tensor,
    gram_matrix: torch.Tensor,
    rho: float = 1.0,
    iterations: int = 20,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """Re-fit the kept weights of ``weight`` for a fixed keep ``mask``; returns the new (sparse) weight."""
    p = make_problem(weight, gram_matrix.to(weight.device), rho, percdamp)
    w, u = p.weight, torch.zeros_like(p.weight)
    for _ in range(iterations):
        w, u = admm_iteration(w, u, mask, p)
    return admm_result(w, u, mask, p)


def cubic_sparsity(final: float, step: int, steps: int) -> float:
    """Sparsity after gradual step ``step`` (0-based) of ``steps``: fast at first, reaching ``final``."""
    return final * (1.0 - (1.0 - (step + 1) / steps) ** 3)


def gradual_mask(v: torch.Tensor, alive: torch.Tensor, sparsity: float, target: Target) -> torch.Tensor:
    """Keep mask at ``sparsity`` from Wanda scores ``|W~ + U|`` (already scaled by the input norms).

    For N:M the final N:M keep set is chosen first and shielded, and the lowest other scores are pruned
    across the layer, so the last step lands exactly on the N:M pattern (as the published code does).
    """
    scores = v.abs() * alive
    if target.nm is None:
        return select_mask(scores, sparsity, target.group)
    keep_nm = select_nm(scores, *target.nm)
    if sparsity >= 1.0 - target.nm[0] / target.nm[1]:
        return keep_nm
    return select_mask(torch.where(keep_nm, torch.inf, scores), sparsity, "per-layer")


def admm_gradual(
    weight: torch.Tensor,
    gram_matrix: torch.Tensor,
    target: Target,
    rho: float = 1.0,
    iterations: int = 20,
    steps: int = 15,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` to ``target`` while ADMM re-fits it; returns (new weight, keep mask)."""
    p = make_problem(weight, gram_matrix.to(weight.device), rho, percdamp)
    final = target.sparsity if target.nm is None else 1.0 - target.nm[0] / target.nm[1]
    w, u = p.weight, torch.zeros_like(p.weight)
    mask = torch.ones_like(w, dtype=torch.bool)
    for t in range(iterations):
        if t < max(steps, 1):
            sparsity = cubic_sparsity(final, t, steps) if steps > 0 else final
            mask = gradual_mask(w + u, p.alive, sparsity, target)
        w, u = admm_iteration(w, u, mask, p)
    return admm_result(w, u, mask, p), mask


def _check_params(name: str, rho: float, iterations: int, percdamp: float) -> None:
    if rho <= 0:
        raise PrunekitError(f"{name}: rho (the ADMM penalty) must be > 0, got {rho}")
    if iterations < 1:
        raise PrunekitError(f"{name}: iterations must be >= 1, got {iterations}")
    if percdamp < 0:
        raise PrunekitError(f"{name}: percdamp must be >= 0 (fraction of mean diag of X^T X), got {percdamp}")


@register_update
@dataclass
class ADMM(Update):
    """Keep the mask, re-fit the kept weights by ADMM (works after any mask criterion)."""

    name = "admm"
    needs = frozenset({HESSIAN})

    rho: float = 1.0
    iterations: int = 20
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        _check_params(self.name, self.rho, self.iterations, self.percdamp)

    def update(
        self, weight: torch.Tensor, mask: torch.Tensor, stats: LayerStats, target: Target
    ) -> tuple[torch.Tensor, torch.Tensor]:
        new = admm_update(weight, mask, gram(stats), self.rho, self.iterations, self.percdamp)
        return new, mask


@register_method
@dataclass
class ADMMGradual(Solver):
    """Gradual in-layer pruning with ADMM (the paper's ADMM-Grad); Wanda scores choose each step's mask."""

    name = "admm-gradual"
    needs = frozenset({HESSIAN})
    default_group = "per-output"

    rho: float = 1.0
    iterations: int = 20
    steps: int = 15
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        _check_params(self.name, self.rho, self.iterations, self.percdamp)
        if not 0 <= self.steps <= self.iterations:
            raise PrunekitError(
                f"admm-gradual: steps (mask-raising iterations) must be in [0, iterations="
                f"{self.iterations}], got {self.steps}"
            )

    def prune(self, weight: torch.Tensor, stats: LayerStats, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
        return admm_gradual(weight, gram(stats), target, self.rho, self.iterations, self.steps, self.percdamp)
