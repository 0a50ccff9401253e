"""Method registry. A new method is one file here plus one import line below."""

from . import admm, dsnot, magnitude, ria, sparsegpt, wanda  # noqa: F401  (registration)
from .base import (
    HESSIAN,
    METHODS,
    NORMS,
    UPDATES,
    Criterion,
    Method,
    Solver,
    Target,
    Update,
    mask_from_scores,
    register_method,
    register_update,
)

__all__ = [
    "HESSIAN",
    "METHODS",
    "NORMS",
    "UPDATES",
    "Criterion",
    "Method",
    "Solver",
    "Target",
    "Update",
    "mask_from_scores",
    "register_method",
    "register_update",
]
