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


# Elements per chunk (16 MiB of fp32): the extra memory of a selection is a few chunks whatever the layer's
# size. Smaller chunks fit caches better but, on a loaded machine, pay for each op's thread start-up and
# barrier: on 2 busy cores 2^18 was 2-5x slower than 2^22 (benchmarks/selection.py).
CHUNK = 1 << 22
# Scores sampled to bracket a whole-layer threshold: the k-th value is then found among the few in the bracket.
SAMPLE = 1 << 19
# Largest M whose N:M blocks are sorted by a network of elementwise min/max (beyond it: the row path).
NM_NETWORK_MAX = 16


def _prune_lowest(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Keep mask pruning the ``k`` lowest scores along ``dim``; among equal scores the lower index goes first.

    The definition every fast path must match (a stable sort), used as is only where ties meet the threshold:
    everything below the k-th smallest value goes, then as many of the values equal to it as are still
    needed, in index order."""
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    kth = scores.kthvalue(k, dim=dim, keepdim=True).values
    below, ties = scores < kth, scores == kth
    still_needed = k - below.sum(dim=dim, keepdim=True)
    return ~(below | (ties & (ties.cumsum(dim=dim) <= still_needed)))


def _rows_per_chunk(cols: int) -> int:
    return max(1, CHUNK // max(cols, 1))


def _kth_per_row(x: torch.Tensor, k: int) -> torch.Tensor:
    """``[rows, 1]`` k-th smallest of each row (``0 < k < cols``), by ``topk`` of the smaller side (cheaper
    than ``kthvalue`` on CPU; neither sorts)."""
    cols = x.shape[1]
    if 2 * k <= cols:
        return x.topk(k, dim=1, largest=False, sorted=False).values.amax(1, keepdim=True)
    return x.topk(cols - k + 1, dim=1, sorted=False).values.amin(1, keepdim=True)


def _prune_lowest_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``_prune_lowest(scores, k, dim=1)`` chunk by chunk of rows. ``scores > kth`` is the answer wherever exactly
    ``k`` scores are ``<= kth``; only rows where more are (ties at the threshold) take the exact tie path."""
    rows, cols = scores.shape
    keep = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    if k <= 0 or k >= cols:
        return keep.fill_(k <= 0)
    step = _rows_per_chunk(cols)
    for start in range(0, rows, step):
        x, out = scores[start : start + step], keep[start : start + step]
        torch.gt(x, _kth_per_row(x, k), out=out)
        tied = (torch.count_nonzero(out, dim=1) != cols - k).nonzero().squeeze(1)
        if tied.numel():
            out[tied] = _prune_lowest(x[tied], k, dim=1)
    return keep


def _prune_lowest_cols(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``_prune_lowest(scores, k, dim=0)``: column chunks transposed to rows, so the row path's cache use holds."""
    rows, cols = scores.shape
    keep = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    step = _rows_per_chunk(rows)
    for start in range(0, cols, step):
        keep[:, start : start + step] = _prune_lowest_rows(scores[:, start : start + step].T.contiguous(), k).T
    return keep


def _bracket(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values ``lo <= hi`` that almost surely enclose the k-th smallest of ``flat``: the sample's order
    statistics 4 standard deviations either side of rank ``k``. Exact when the sample is the whole tensor."""
    n = flat.numel()
    if n <= SAMPLE:
        sample = flat
    else:  # random positions, not a stride: a stride can alias with the columns of a structured matrix
        gen = torch.Generator().manual_seed(0)
        sample = flat[torch.randint(n, (SAMPLE,), generator=gen).to(flat.device)]
    s, q = sample.numel(), k / n
    spread = 4 * math.sqrt(s * q * (1 - q)) + 1
    lo_rank, hi_rank = math.floor(q * s - spread), math.ceil(q * s + spread)
    inf = torch.tensor(math.inf, dtype=flat.dtype, device=flat.device)
    lo = sample.kthvalue(lo_rank).values if lo_rank >= 1 else -inf
    hi = sample.kthvalue(hi_rank).values if hi_rank <= s else inf
    return lo, hi


def _kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th smallest of a 1-D tensor: count what lies below a sampled bracket, then ``kthvalue`` over
    the few scores inside it. Falls back to ``kthvalue`` over everything if the bracket missed."""
    lo, hi = _bracket(flat, k)
    below, inside = torch.zeros((), dtype=torch.long, device=flat.device), []
    for chunk in flat.split(CHUNK):
        under = chunk < lo
        below += torch.count_nonzero(under)
        inside.append(chunk[(chunk <= hi) & ~under])
    inside, below = torch.cat(inside), int(below)
    if below < k <= below + inside.numel():
        return inside.kthvalue(k - below).values
    return flat.kthvalue(k).values


def _prune_lowest_flat(flat: torch.Tensor, k: int) -> torch.Tensor:
    """``_prune_lowest(flat, k, dim=0)`` for a 1-D tensor in bounded memory: ``flat > kth`` chunk by chunk, then,
    only if ties meet the threshold, the first of them in index order are pruned, chunk by chunk."""
    keep = torch.empty(flat.shape, dtype=torch.bool, device=flat.device)
    if k <= 0 or k >= flat.numel():
        return keep.fill_(k <= 0)
    kth = _kth_smallest(flat, k)
    pairs = list(zip(flat.split(CHUNK), keep.split(CHUNK)))
    for chunk, out in pairs:
        torch.gt(chunk, kth, out=out)
    at_most_kth = flat.numel() - int(torch.count_nonzero(keep))
    if at_most_kth > k:
        _keep_later_ties(pairs, kth, at_most_kth - k)
    return keep


def _keep_later_ties(pairs: list[tuple[torch.Tensor, torch.Tensor]], kth: torch.Tensor, spare: int) -> None:
    """Of the scores equal to ``kth`` (all pruned so far), keep the last ``spare`` in index order."""
    ties = [int(torch.count_nonzero(chunk == kth)) for chunk, _ in pairs]
    to_prune = sum(ties) - spare
    for (chunk, out), count in zip(pairs, ties):
        if count and to_prune <= 0:
            out |= chunk == kth
        elif count and to_prune < count:
            equal = chunk == kth
            out |= equal & (equal.cumsum(0) > to_prune)
        to_prune -= count


@register_group("per-output")
def per_output(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Each output row prunes exactly ``floor(cols * sparsity)`` (Wanda's default for LLMs)."""
    return _prune_lowest_rows(scores, int(scores.shape[1] * sparsity))


@register_group("per-input")
def per_input(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Each input column prunes exactly ``floor(rows * sparsity)``."""
    return _prune_lowest_cols(scores, int(scores.shape[0] * sparsity))


@register_group(GLOBAL)
@register_group("per-layer")
def per_layer(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The whole layer prunes ``floor(numel * sparsity)`` (magnitude's default; Wanda's for vision)."""
    return _prune_lowest_flat(scores.reshape(-1), int(scores.numel() * sparsity)).reshape(scores.shape)


def select_global(scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold across layers: ``floor(total * sparsity)`` lowest scores pruned, wherever they are."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float().cpu() for n in names])
    keep = _prune_lowest_flat(flat, int(flat.numel() * sparsity))
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start : start + size].reshape(scores[n].shape).to(scores[n].device)
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
        raise PrunekitError(
            f"{nm[0]}:{nm[1]} sparsity needs the input dimension to be a multiple of {nm[1]}, "
            f"but {name} has {cols} input columns; exclude it (--exclude) or pick another M"
        )


# Sorting networks (compare-exchange pairs) that sort a block of M scores; other M use odd-even transposition.
_NETWORKS = {
    2: [(0, 1)],
    4: [(0, 1), (2, 3), (0, 2), (1, 3), (1, 2)],
    8: [
        (0, 2),
        (1, 3),
        (4, 6),
        (5, 7),
        (0, 4),
        (1, 5),
        (2, 6),
        (3, 7),
        (0, 1),
        (2, 3),
        (4, 5),
        (6, 7),
        (2, 4),
        (3, 5),
        (1, 4),
        (3, 6),
        (1, 2),
        (3, 4),
        (5, 6),
    ],
}


def sorting_network(m: int) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``: exchanging where ``v[i] > v[j]`` in this order sorts any ``m`` values."""
    return _NETWORKS.get(m) or [(i, i + 1) for r in range(m) for i in range(r % 2, m - 1, 2)]


def _sorted_columns(blocks: torch.Tensor) -> list[torch.Tensor]:
    """``[B, m]`` -> the ``m`` order statistics of each block, as ``m`` vectors: a sorting network of elementwise
    min/max, which beats ``sort``/``topk``/``kthvalue`` along a dimension of size ``m`` (per-slice overhead)."""
    v = list(blocks.unbind(1))
    for i, j in sorting_network(blocks.shape[1]):
        v[i], v[j] = torch.minimum(v[i], v[j]), torch.maximum(v[i], v[j])
    return v


def _stable_ranks(blocks: torch.Tensor) -> torch.Tensor:
    """``[B, m]`` -> each score's position in a stable ascending sort of its block, from one comparison per
    pair (for ``i < j``, ``blocks[:, i] <= blocks[:, j]`` puts ``i`` first). For the blocks with ties only."""
    m = blocks.shape[1]
    ranks = torch.zeros(blocks.shape, dtype=torch.uint8, device=blocks.device)
    for i in range(m):
        for j in range(i + 1, m):
            first = blocks[:, i] <= blocks[:, j]
            ranks[:, j] += first
            ranks[:, i] += ~first
    return ranks


def _prune_lowest_blocks(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """``_prune_lowest(blocks, k, dim=1)`` for small blocks: keep what is above the k-th order statistic;
    blocks where the k-th equals the (k+1)-th (a tie at the threshold) are ranked exactly."""
    order = _sorted_columns(blocks)
    keep = blocks > order[k - 1].unsqueeze(1)
    tied = (order[k - 1] == order[k]).nonzero().squeeze(1)
    if tied.numel():
        keep[tied] = _stable_ranks(blocks[tied]) >= k
    return keep


def select_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive scores along the input dimension (ties: the lower
    index is pruned first). Small ``m`` sorts blocks with a network; large ``m`` uses the row path on blocks."""
    rows, cols = scores.shape
    check_nm(cols, (n, m))
    keep = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    step = _rows_per_chunk(cols)
    for start in range(0, rows, step):
        blocks = scores[start : start + step].reshape(-1, m)
        chosen = _prune_lowest_blocks(blocks, m - n) if m <= NM_NETWORK_MAX else _prune_lowest_rows(blocks, m - n)
        keep[start : start + step] = chosen.reshape(-1, cols)
    return keep


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
