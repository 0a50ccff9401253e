"""What a pruning method is: a mask criterion (``score``), a solver (``prune``), or a weight update.

Methods see one matmul at a time: ``W`` is the float32 ``[rows, cols]`` matrix of one layer (or of one
conv group) and ``stats`` its input statistics (``LayerStats``). They declare the statistics they need
in ``needs`` so the engine only collects those (norms are cheap, a Hessian is cols x cols).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..collect import LayerStats
from ..groups import select_mask
from ..registry import Registry

NORMS, HESSIAN = "norms", "hessian"


@dataclass(frozen=True)
class Target:
    """What one layer must reach: a sparsity inside a comparison group, or an N:M pattern."""

    sparsity: float
    group: str = "per-output"
    nm: tuple[int, int] | None = None


@dataclass
class Method:
    """A mask criterion: ``score`` returns importance (higher = keep). Subclasses are dataclasses whose
    fields are the method's hyper-parameters (set from the CLI / recipes by name)."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    default_group: ClassVar[str] = "per-output"
    # Solvers choose their own masks inside ``prune`` (SparseGPT); the engine then skips group selection.
    solver: ClassVar[bool] = False

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement score() or be a solver")

    def prune(self, weight: torch.Tensor, stats: LayerStats, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
        """Solvers only: return the updated weight and its keep mask."""
        raise NotImplementedError(f"{type(self).__name__} is not a solver")


@dataclass
class Update:
    """Runs after the mask is chosen: re-fits kept weights (ADMM) and/or refines the mask (DSnoT)."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()

    def update(self, weight: torch.Tensor, mask: torch.Tensor, stats: LayerStats,
               target: Target) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


@dataclass
class ModelMethod:
    """A method that changes the model's structure (removes blocks, heads, channels; rotates and slices)
    instead of zeroing weights layer by layer. ``prune_model`` gets the model and calibration batches,
    removes about ``ratio`` of the selected parameters, and returns a JSON-able summary for the report."""

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = True

    def prune_model(self, model, batches: list, ratio: float) -> dict:
        raise NotImplementedError


METHODS: Registry[Method] = Registry("method")
STRUCTURED: Registry[ModelMethod] = Registry("structured method")
UPDATES: Registry[Update] = Registry("update")
register_method = METHODS.register
register_update = UPDATES.register
register_structured = STRUCTURED.register
create_method = METHODS.create
create_update = UPDATES.create


def mask_from_scores(scores: torch.Tensor, target: Target) -> torch.Tensor:
    return select_mask(scores, target.sparsity, target.group, target.nm)
