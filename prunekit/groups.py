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

# ``scores [rows, cols], sparsity -> keep mask``. "global" competes across layers; the engine chooses its
# masks with ``select_global`` (on one layer alone it is per-layer).
GROUPS: Registry[Callable[[torch.Tensor, float], torch.Tensor]] = Registry("comparison group")
GLOBAL = "global"


def register_group(name: str):
    """``@register_group("my-group")`` on a ``scores, sparsity -> keep mask`` function."""
    return GROUPS.register(name=name)


def _prune_lowest(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Keep mask pruning the ``k`` lowest scores along ``dim``; among equal scores the lower index goes first.

    The same mask as a stable sort, without sorting: everything below the k-th smallest value goes, then as many
    of the values equal to it as are still needed, in index order (2-4x faster than ``torch.sort`` on CPU for
    the 10^7-10^8 scores of one large layer)."""
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    kth = scores.kthvalue(k, dim=dim, keepdim=True).values
    below, ties = scores < kth, scores == kth
    still_needed = k - below.sum(dim=dim, keepdim=True)
    return ~(below | (ties & (ties.cumsum(dim=dim) <= still_needed)))


@register_group("per-output")
def per_output(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Each output row prunes exactly ``floor(cols * sparsity)`` (Wanda's default for LLMs)."""
    return _prune_lowest(scores, int(scores.shape[1] * sparsity), dim=1)


@register_group("per-input")
def per_input(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Each input column prunes exactly ``floor(rows * sparsity)``."""
    return _prune_lowest(scores, int(scores.shape[0] * sparsity), dim=0)


@register_group(GLOBAL)
@register_group("per-layer")
def per_layer(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The whole layer prunes ``floor(numel * sparsity)`` (magnitude's default; Wanda's for vision)."""
    return _prune_lowest(scores.reshape(-1), int(scores.numel() * sparsity), dim=0).reshape(scores.shape)


def select_global(scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold across layers: ``floor(total * sparsity)`` lowest scores pruned, wherever they are."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float().cpu() for n in names])
    keep = _prune_lowest(flat, int(flat.numel() * sparsity), dim=0)
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start:start + size].reshape(scores[n].shape).to(scores[n].device)
        start += size
    return out


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


def check_nm(cols: int, nm: tuple[int, int], name: str = "layer") -> None:
    if cols % nm[1]:
        raise PrunekitError(f"{nm[0]}:{nm[1]} sparsity needs the input dimension to be a multiple of {nm[1]}, "
                         f"but {name} has {cols} input columns; exclude it (--exclude) or pick another M")


def select_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive scores along the input dimension."""
    rows, cols = scores.shape
    check_nm(cols, (n, m))
    blocks = scores.reshape(rows, cols // m, m)
    return _prune_lowest(blocks, m - n, dim=2).reshape(rows, cols)


def select_mask(scores: torch.Tensor, sparsity: float, group: str = "per-output",
                nm: tuple[int, int] | None = None) -> torch.Tensor:
    """The keep mask of one layer for its ``[out, cols]`` scores."""
    if nm is not None:
        return select_nm(scores, *nm)
    return GROUPS[group](scores, sparsity)


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or math.isnan(sparsity) or not 0 <= sparsity < 1:
        raise PrunekitError(f"sparsity must be in [0, 1) (the fraction of weights set to zero), got {sparsity!r}")
    return float(sparsity)

