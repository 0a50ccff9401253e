"""Comparison groups: where scores compete. ``scores -> keep mask`` (True = keep), method-agnostic.

Ties are broken deterministically: among equal scores the lower index is pruned first (a stable sort).
N:M follows the hardware convention: keep at most N of every M consecutive weights along the input
dimension (2:4 keeps 2 of 4).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import torch

from .errors import PrunekitError
from .registry import Registry
from .selection import prune_lowest_flat, prune_lowest_parts, prune_lowest_slices, select_nm

# ``scores [rows, cols], sparsity -> keep mask``. "global" competes across layers; the engine chooses its
# masks with ``select_global`` (on one layer alone it is per-layer).
GROUPS: Registry[Callable[[torch.Tensor, float], torch.Tensor]] = Registry("comparison group")
GLOBAL = "global"


def register_group(name: str):
    """``@register_group("my-group")`` on a ``scores, sparsity -> keep mask`` function."""
    return GROUPS.register(name=name)


@register_group("per-output")
def per_output(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Each output row prunes exactly ``floor(cols * sparsity)`` (Wanda's default for LLMs)."""
    return prune_lowest_slices(scores, int(scores.shape[1] * sparsity), 1)


@register_group("per-input")
def per_input(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Each input column prunes exactly ``floor(rows * sparsity)``."""
    return prune_lowest_slices(scores, int(scores.shape[0] * sparsity), 0)


@register_group("per-layer")
def per_layer(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The whole layer prunes ``floor(numel * sparsity)`` (magnitude's default; Wanda's for vision)."""
    return prune_lowest_flat(scores.reshape(-1), int(scores.numel() * sparsity)).reshape(scores.shape)


@register_group(GLOBAL)
def global_threshold(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """One threshold across all selected layers (the engine selects them together: ``select_global``)."""
    return per_layer(scores, sparsity)  # one layer alone


def select_global(scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold across layers: ``floor(total * sparsity)`` lowest scores pruned, wherever they are, compared
    as float32 (ties: the earlier layer, then the lower index, first). Never concatenated: no copy of them all."""
    names, exact = list(scores), (torch.float32, torch.float16, torch.bfloat16)
    parts = [scores[n].reshape(-1) if scores[n].dtype in exact else scores[n].reshape(-1).float() for n in names]
    keep = prune_lowest_parts(parts, int(sum(p.numel() for p in parts) * sparsity))
    return {n: m.reshape(scores[n].shape) for n, m in zip(names, keep)}


def parse_pattern(pattern: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; ``None``/``"unstructured"`` -> ``None``. Validates ``0 < n < m``."""
    if pattern is None or pattern == "unstructured":
        return None
    if isinstance(pattern, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
        if not match:
            raise PrunekitError(f"pattern {pattern!r} is not N:M (e.g. '2:4': keep 2 of every 4 weights)")
        pattern = int(match[1]), int(match[2])
    n, m = pattern
    if not 0 < n < m:
        raise PrunekitError(f"N:M pattern {n}:{m} needs 0 < N < M (N is the number of weights kept of every M)")
    return n, m


def select_mask(
    scores: torch.Tensor, sparsity: float, group: str = "per-output", nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """The keep mask of one layer for its ``[out, cols]`` scores."""
    if nm is not None:
        return select_nm(scores, *nm)
    return GROUPS[group](scores, sparsity)


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or math.isnan(sparsity) or not 0 <= sparsity < 1:
        raise PrunekitError(f"sparsity must be in [0, 1) (the fraction of weights set to zero), got {sparsity!r}")
    return float(sparsity)
