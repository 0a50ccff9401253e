"""Small linear-algebra helpers shared by the weight-update methods (SparseGPT, ADMM).

Both solve the layer-wise problem ``min ||W X - W_hat X||^2`` whose Gram matrix is ``X^T X`` (or the
Hessian ``2 X^T X / n``, the same up to a scale). Factorisations run in float32 on the weight's device.
"""

from __future__ import annotations

import torch

from ..collect import LayerStats
from ..errors import PrunekitError


def gram(stats: LayerStats) -> torch.Tensor:
    """The ``[cols, cols]`` Hessian of one matmul (``stats`` of a single group, as methods receive)."""
    hessian = stats.hessian()
    if hessian.shape[0] != 1:
        raise PrunekitError(f"expected the statistics of one conv group, got {hessian.shape[0]} groups")
    return hessian[0].float()


def add_to_diagonal(matrix: torch.Tensor, value: float | torch.Tensor) -> torch.Tensor:
    """``matrix + value * I`` without building the identity (returns a new tensor)."""
    out = matrix.clone()
    out.diagonal().add_(value)
    return out


def cholesky(matrix: torch.Tensor, upper: bool = False, what: str = "the Hessian") -> torch.Tensor:
    """Cholesky factor with an error that says what to change when ``matrix`` is not positive definite."""
    factor, info = torch.linalg.cholesky_ex(matrix, upper=upper)
    if int(info) != 0:
        raise PrunekitError(
            f"{what} is not positive definite (Cholesky failed at column {int(info) - 1}); the calibration "
            "inputs are (nearly) rank deficient: raise percdamp or use more calibration samples"
        )
    return factor


def inverse_cholesky_upper(hessian: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), as SparseGPT uses it.

    Row ``j`` of ``U`` divided by ``U[j, j]`` is row ``j`` of the inverse Hessian of columns ``j..`` after
    columns ``< j`` were eliminated, so one factorisation serves the whole left-to-right sweep.
    """
    lower = cholesky(hessian)
    inverse = torch.cholesky_inverse(lower)
    del lower  # three [cols, cols] matrices at once, not four, at the peak (the last factorisation)
    return cholesky(inverse, upper=True, what="the inverse Hessian")


def spd_inverse(matrix: torch.Tensor, what: str = "the Gram matrix") -> torch.Tensor:
    """Inverse of a symmetric positive definite matrix through one Cholesky factorisation."""
    return torch.cholesky_inverse(cholesky(matrix, what=what))
