"""SparseGPT (Frantar & Alistarh 2023): choose the mask and re-fit the weights in one left-to-right sweep.

Each column ``j`` is pruned in turn; the error it leaves is spread over the columns not yet visited with
the Optimal Brain Surgeon update ``delta = -(w_j - q_j) / [H^-1]_jj * H^-1[j, j:]``, where ``H^-1`` is
the inverse Hessian of the columns ``j..`` only. One upper Cholesky factor of ``H^-1`` gives all those
rows at once. Columns are processed in blocks of ``blocksize``: inside a block updates are applied
column by column, the rest of the matrix gets the block's accumulated error in one matmul (lazy batch
updates, same result). Masks are chosen adaptively with the OBS saliency ``w^2 / [H^-1]_jj^2``: for
unstructured sparsity once per block of columns, compared within the target's group inside the block
(the published code compares across the whole block: ``per-layer``, our default); for N:M at every M-th
column, on the weights as the sweep has updated them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..collect import LayerStats
from ..errors import PrunekitError
from ..groups import select_mask
from ..selection import select_nm
from ._linalg import gram, inverse_cholesky_upper
from .base import HESSIAN, Solver, Target, register_method


@register_method
@dataclass
class SparseGPT(Solver):
    """OBS-based pruning with weight reconstruction; ``percdamp`` x mean(diag H) is added to H."""

    name = "sparsegpt"
    needs = frozenset({HESSIAN})
    default_group = "per-layer"

    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        if self.blocksize < 1:
            raise PrunekitError(f"sparsegpt blocksize must be a positive number of columns, got {self.blocksize}")
        if self.percdamp < 0:
            raise PrunekitError(f"sparsegpt percdamp must be >= 0 (fraction of mean diag(H)), got {self.percdamp}")

    def prune(self, weight: torch.Tensor, stats: LayerStats, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
        return sparsegpt(weight, gram(stats).to(weight.device), target, self.blocksize, self.percdamp)


def sparsegpt(
    weight: torch.Tensor, hessian: torch.Tensor, target: Target, blocksize: int = 128, percdamp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight [rows, cols]`` given its input Hessian; returns (new weight, keep mask)."""
    _check_blocksize(blocksize, target)
    weight, hessian = drop_dead_inputs(weight.float().clone(), hessian.float().clone())
    hessian.diagonal().add_(percdamp * hessian.diagonal().mean())  # damped in place: our copy, one [cols, cols] fewer
    uinv = inverse_cholesky_upper(hessian)
    del hessian  # 485 MB for a 7B down_proj, not needed during the sweep
    keep = torch.ones_like(weight, dtype=torch.bool)
    cols = weight.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        err = _sweep_block(weight[:, i1:i2], keep[:, i1:i2], uinv[i1:i2, i1:i2], target)
        weight[:, i2:] -= err @ uinv[i1:i2, i2:]
    return weight * keep, keep


def drop_dead_inputs(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs that were always zero carry no information: zero their weights, make H invertible there."""
    dead = hessian.diagonal() == 0
    hessian.diagonal()[dead] = 1.0
    weight[:, dead] = 0.0
    return weight, hessian


def _check_blocksize(blocksize: int, target: Target) -> None:
    if target.nm is not None and blocksize % target.nm[1]:
        raise PrunekitError(
            f"sparsegpt blocksize {blocksize} must be a multiple of M={target.nm[1]} for "
            f"{target.nm[0]}:{target.nm[1]} sparsity (each group of M columns lies in one block)"
        )


def _sweep_block(w1: torch.Tensor, keep1: torch.Tensor, u1: torch.Tensor, target: Target) -> torch.Tensor:
    """Prune the block's columns in order, updating ``w1`` / ``keep1`` in place; returns the scaled errors
    ``(w - q) / U_jj`` that the columns right of the block still have to absorb."""
    d = u1.diagonal()
    if target.nm is None:
        keep1.copy_(select_mask(w1.square() / d.square(), target.sparsity, target.group))
    wt, keept = w1.t().contiguous(), keep1.t().contiguous()  # column i of the block = contiguous row i
    err = torch.empty_like(wt)
    for i in range(wt.shape[0]):
        if target.nm is not None and i % target.nm[1] == 0:
            _select_nm_columns(wt, keept, d, i, target.nm)
        torch.mul(wt[i], ~keept[i], out=err[i]).div_(d[i])
        wt[i:].addr_(u1[i, i:], err[i], alpha=-1.0)  # OBS update of the block's remaining columns
    w1.copy_(wt.t())
    keep1.copy_(keept.t())
    return err.t()


def _select_nm_columns(wt: torch.Tensor, keept: torch.Tensor, d: torch.Tensor, i: int, nm: tuple[int, int]) -> None:
    """N:M for columns ``i..i+M`` (rows of the transposed block), chosen on the weights as updated so far
    (the published timing)."""
    n, m = nm
    saliency = wt[i : i + m].square() / d[i : i + m, None].square()
    keept[i : i + m] = select_nm(saliency.t(), n, m).t()
