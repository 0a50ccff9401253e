"""What a pruning method is. Two protocols, one registry:

* a **criterion** (``Criterion.score``) says how important each weight is; the engine then picks the mask
  inside the layer's comparison group (or N:M pattern);
* a **solver** (``Solver.prune``) chooses its own mask while it changes the weights (SparseGPT, ADMM-gradual).

An **update** runs after either: it re-fits kept weights (ADMM) and/or refines the mask (DSnoT).

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
    """What every registered method has. Subclasses are dataclasses whose fields are the method's
    hyper-parameters (set from the CLI / recipes by name)."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    default_group: ClassVar[str] = "per-output"


@dataclass
class Criterion(Method):
    """A mask criterion: ``score`` returns importance (higher = keep)."""

    def score(self, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement score()")


@dataclass
class Solver(Method):
    """Chooses its own mask while updating the weights; the engine skips group selection for it."""

    def prune(self, weight: torch.Tensor, stats: LayerStats, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the updated weight and its keep mask."""
        raise NotImplementedError(f"{type(self).__name__} must implement prune()")


@dataclass
class Update:
    """Runs after the mask is chosen: re-fits kept weights (ADMM) and/or refines the mask (DSnoT)."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()

    def update(
        self, weight: torch.Tensor, mask: torch.Tensor, stats: LayerStats, target: Target
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("method")
UPDATES: Registry[type[Update]] = Registry("update")
register_method = METHODS.register
register_update = UPDATES.register


def mask_from_scores(scores: torch.Tensor, target: Target) -> torch.Tensor:
    return select_mask(scores, target.sparsity, target.group, target.nm)
