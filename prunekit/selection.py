"""Threshold selection: the ``k`` lowest scores of every row, column, whole layer or N:M block, as a keep mask.

The algorithms behind the comparison groups (``prunekit.groups``), exact and bit-identical to a stable sort (among
equal scores the lower index is pruned first), with bounded scratch memory: a sampled guess per slice, counting
passes that bracket the k-th value, and an exact tie path only where the k-th value repeats. On the CPU the
compiled kernels (``prunekit.kernels``) take the common cases; NaN slices, float64 and CUDA take the torch path.
"""

from __future__ import annotations

import math
import struct
from functools import reduce

import numpy as np
import torch

from .errors import PrunekitError

# Scores per chunk: a selection's scratch is at most ~13 bytes per chunk element (two float32 chunks, one of
# bytes, a copy of a chunk of columns), whatever the layer's size. Also at most 2^24, so that float32 counts
# stay exact. Smaller chunks fit caches better but, on a loaded machine, pay for each parallel op's wait on a
# descheduled helper thread (ms each): 2^23 was the best compromise on 2 busy cores (benchmarks/selection.py).
CHUNK = 1 << 23
# Scores sampled to bracket a whole-layer threshold: the k-th value is then found among the few in the bracket.
SAMPLE = 1 << 19
# The same for the compiled CPU path, which gathers candidates as cheaply as it counts: a smaller sample (random
# reads) and a wider bracket.
KERNEL_SAMPLE = 1 << 16
# Scores sampled per row (or column) for a first guess of its k-th smallest; shorter slices use ``topk``.
SLICE_SAMPLE = 96
SEARCH_MIN = 512
# A slice gathers at most max(this, 1/8 of its scores) candidates around its k-th; more (heavy ties) fall back.
CANDIDATES_MIN = 64
# Candidates sorted at once: below torch's parallel grain (32768 elements), so these many small ops run on one
# thread; on a loaded machine each parallel op can wait ~10 ms for a descheduled helper thread.
BATCH = 1 << 14
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


def _count(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-slice ``True`` count, ``int32``, keepdim (uint8 sums beat ``sum``/``count_nonzero`` of bool)."""
    return mask.view(torch.uint8).sum(dim, keepdim=True, dtype=torch.int32)


def _count_le(x: torch.Tensor, t: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """Per-slice count of ``x <= t`` along dim 1, keepdim, as float32 (exact below 2^24): a comparison written as
    0/1 into a reused float32 buffer and a float sum are both vectorized, where per-slice sums of bool are not
    (10x slower on CPU)."""
    return torch.le(x, t, out=buf).sum(1, keepdim=True)


def _kth_topk(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Each slice's k-th smallest (``0 < k < n``) by ``topk`` of the smaller side (cheaper than ``kthvalue``
    on CPU; neither sorts). The fallback where the sampled search does not apply."""
    n = x.shape[dim]
    if 2 * k <= n:
        return x.topk(k, dim, largest=False, sorted=False).values.amax(dim, keepdim=True)
    return x.topk(n - k + 1, dim, sorted=False).values.amin(dim, keepdim=True)


# The search below works on chunks shaped ``[A, n, B]``: the ``A * B`` slices (rows, or columns) compete along
# ``n``. A chunk of rows is ``[rows, n, 1]``; a chunk of columns is copied into blocks of ``B`` adjacent columns,
# ``[cols / B, n, B]``, so that every pass reads contiguous memory and a block's candidates come out together.


def _rank_guess(scores: torch.Tensor, k: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slice, a guess of its k-th smallest and of the value gained per rank around it, read off one sort of
    a strided sample of about ``SLICE_SAMPLE`` scores from every slice."""
    n = scores.shape[dim]
    step = max(1, n // SLICE_SAMPLE)
    s = (scores[:, ::step] if dim else scores[::step].T).sort(1).values.float()  # no half-precision slopes
    m = s.shape[1]
    j = min(m - 1, max(0, round(k * m / n - 0.5)))
    lo, hi = max(0, j - 6), min(m - 1, j + 6)
    return s[:, j], (s[:, hi] - s[:, lo]) / ((hi - lo) * n / m)


def _bracket(x: torch.Tensor, k: int, buf: torch.Tensor, t0: torch.Tensor, slope: torch.Tensor):
    """Per slice, values ``lo <= hi`` that should enclose ranks ``k`` and ``k + 1`` with a few dozen scores
    between them: a Newton step from the sampled guess, then a secant through the two exact counts, widened
    by a margin for the scores' irregular spacing. Two counting passes."""
    c0 = _count_le(x, t0, buf)
    t1 = t0 + (k + 0.5 - c0) * slope
    c1 = _count_le(x, t1, buf)
    moved = c1 - c0
    slope = torch.where(moved != 0, (t1 - t0) / moved, slope)
    miss = (k - c1).abs()
    margin = 4 * (miss + 4).sqrt() + 0.4 * miss
    lo = t1 + (k - margin - c1) * slope
    return lo, torch.maximum(lo, t1 + (k + 1 + margin - c1) * slope)  # lo <= hi even when rounding or inf bite


def _marked(bits: torch.Tensor) -> torch.Tensor:
    """Flat positions of the ``True``s of a bool buffer whose length is a multiple of 8, ascending: read 8 to an
    int64 word, ``nonzero`` scans 8x fewer elements (4x faster on CPU than over the bytes), then looks inside
    the few marked words, 4096 at a time so that torch runs those small ops on one thread (see ``BATCH``)."""
    found = []
    for words in bits.view(torch.int64).nonzero().squeeze(1).split(4096):
        inner = bits.view(-1, 8).index_select(0, words).nonzero()
        found.append(torch.add(inner[:, 1], words.index_select(0, inner[:, 0]), alpha=8))
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long, device=bits.device)


def _candidates(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bufs: tuple[torch.Tensor, ...]):
    """One comparison of a chunk against both ends: per slice how many scores lie below ``lo`` and how many in
    ``[lo, hi]`` (a score equal to ``lo`` is inside, so a bracket on a tied value holds it), and their flat
    positions. A slice with more than 1/8 of its scores inside gathers none (count 0: it falls back)."""
    buf, bits = bufs
    ends = torch.stack([torch.nextafter(lo, torch.full_like(lo, -math.inf)), hi])  # x < lo: x <= the float before
    upto = torch.le(x, ends, out=buf.view(2, *x.shape))
    counts = upto.sum(2, keepdim=True)
    below, inside = counts[0], counts[1] - counts[0]
    bits = bits[: -(-x.numel() // 8) * 8]  # whole int64 words: the tail stays False
    bits[x.numel() :].zero_()
    marks = torch.gt(upto[1], upto[0], out=bits[: x.numel()].view(x.shape))  # lo <= x <= hi
    below, inside = below.flatten().long(), inside.flatten().long()
    crowded = (inside > max(CANDIDATES_MIN, x.shape[1] // 8)).nonzero().squeeze(1)
    if crowded.numel():
        marks[crowded // x.shape[2], :, crowded % x.shape[2]] = False
        inside[crowded] = 0
    return below, inside, _marked(bits)


def _sorted_keys(values: torch.Tensor, slice_id: torch.Tensor, signed: bool) -> torch.Tensor:
    """``values`` (float32 or narrower) sorted by (slice, value), as int64 keys: the slice in the high half, the
    float's bits in the low half, made monotone first if some may be negative (a negative float flips its
    magnitude bits; ``_key_values`` undoes it)."""
    bits = values.float().view(torch.int32)
    if signed:
        bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return ((slice_id << 32) + bits).sort().values


def _key_values(keys: torch.Tensor, signed: bool) -> torch.Tensor:
    """The float32 values of ``_sorted_keys`` keys (the low halves)."""
    bits = keys.to(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF) if signed else bits).view(torch.float32)


def _batches(inside: torch.Tensor, block: int) -> list[tuple[int, int]]:
    """Runs ``[first, last)`` of slices, whole blocks of ``block``, holding about ``BATCH`` candidates each on
    the CPU (one run elsewhere: the batching only dodges CPU thread waits)."""
    ends = inside.cumsum(0)
    size = BATCH if inside.device.type == "cpu" else max(1, int(ends[-1]))
    marks = torch.arange(1, max(1, -(-int(ends[-1]) // size)), device=ends.device) * size
    edges = sorted({0, len(inside), *(c - c % block for c in torch.searchsorted(ends, marks).tolist())})
    return list(zip(edges[:-1], edges[1:]))


def _kth_of_candidates(
    x: torch.Tensor, k: int, below: torch.Tensor, inside: torch.Tensor, at: torch.Tensor, signed: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per slice of a chunk: the k-th smallest, whether the bracket held it (ranks ``k`` and ``k + 1`` both
    inside) and whether it surely separates (held, and the two differ). Candidates are sorted ``BATCH`` at a
    time: torch runs ops that small on one thread, and on a loaded machine every parallel op waits ~10 ms for
    a descheduled helper thread."""
    (_, n, block), rank = x.shape, k - below  # rank of the k-th among the slice's candidates
    held, start = (rank >= 1) & (rank < inside), (inside.cumsum(0) - inside).tolist()
    kth, after = torch.zeros(len(rank), device=x.device), torch.zeros(len(rank), device=x.device)
    for a, b in _batches(inside, block):
        first, last = start[a], start[b - 1] + int(inside[b - 1])
        if last - first < 2:
            continue
        pos = at[first:last]
        keys = _sorted_keys(x.view(-1).index_select(0, pos), pos // (n * block) * block + pos % block - a, signed)
        i = (inside[a:b].cumsum(0) - inside[a:b] + rank[a:b] - 1).clamp(0, last - first - 2)
        kth[a:b] = _key_values(keys.index_select(0, i), signed)
        after[a:b] = _key_values(keys.index_select(0, i + 1), signed)
    return kth, held, held & (kth < after)


def _chunk_thresholds(x: torch.Tensor, k: int, bufs: tuple[torch.Tensor, ...], t0: torch.Tensor, slope: torch.Tensor):
    """Per slice of a ``[A, n, B]`` chunk (flat, slice ``a * B + b``): the k-th smallest, whether the bracket
    held it, and whether it surely separates exactly ``k`` scores. Every pass runs on the chunk while it is
    in cache."""
    guess = (t0.view(x.shape[0], 1, x.shape[2]), slope.view(x.shape[0], 1, x.shape[2]))
    lo, hi = _bracket(x, k, bufs[0][: x.numel()].view(x.shape), *guess)
    return _kth_of_candidates(x, k, *_candidates(x, lo, hi, bufs), signed=bool((lo < 0).any()))


def _as_chunk(x: torch.Tensor, dim: int, buf: torch.Tensor | None) -> torch.Tensor:
    """A chunk of rows as ``[rows, n, 1]`` (copied into ``buf`` if strided), or a ``[n, cols]`` chunk of columns
    copied into ``buf`` as ``[cols / B, n, B]``, ``B`` adjacent columns (up to 32) contiguous: a cheap strided
    copy, where a transposing one costs 10x more on CPU."""
    if dim == 1:
        return (x if x.is_contiguous() else buf[: x.numel()].view(x.shape).copy_(x)).unsqueeze(2)
    n, cols = x.shape
    block = math.gcd(cols, 32)
    return buf[: x.numel()].view(cols // block, n, block).copy_(x.view(n, cols // block, block).transpose(0, 1))


def _slice_thresholds(scores: torch.Tensor, k: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slice's k-th smallest (shaped to broadcast), and which of them surely separate exactly ``k`` scores
    (the others are checked for ties after), chunk by chunk of whole slices; slices the bracket missed get
    theirs from ``topk``. Scratch: two chunks of float32, a chunk of bytes, for columns a copy of the chunk."""
    n, step = scores.shape[dim], max(1, CHUNK // scores.shape[dim])
    if n < max(SEARCH_MIN, 2) or scores.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        kth = torch.cat([_kth_topk(x, k, dim) for x in scores.split(step, 1 - dim)], 1 - dim)
        return kth, torch.zeros(scores.shape[1 - dim], dtype=torch.bool, device=scores.device)
    step = step - step % 32 if step >= 32 else step
    bufs = (
        torch.empty(2 * step * n, device=scores.device),
        torch.empty(-(-step * n // 8) * 8, dtype=torch.bool, device=scores.device),
    )
    copy = None if dim and scores.is_contiguous() else torch.empty(step * n, dtype=scores.dtype, device=scores.device)
    parts = [
        _chunk_thresholds(_as_chunk(x, dim, copy), k, (bufs[0][: 2 * x.numel()], bufs[1]), *g)
        for x, *g in zip(scores.split(step, 1 - dim), *(v.split(step) for v in _rank_guess(scores, k, dim)))
    ]
    kth, held, sure = (torch.cat(p) for p in zip(*parts))
    for missed in (~held).nonzero().squeeze(1).split(step):
        kth.index_copy_(0, missed, _kth_topk(scores.index_select(1 - dim, missed), k, dim).flatten().to(kth.dtype))
    kth = kth.to(scores.dtype)
    return (kth.view(-1, 1) if dim else kth.view(1, -1)), sure


def _kernels(scores: torch.Tensor, n: int):
    """The compiled CPU kernels (``prunekit.kernels``) if they take ``scores`` competing in slices of ``n`` (0: a
    whole layer, no slices), else ``None`` (imported on first use: numba takes a moment to import)."""
    if scores.device.type != "cpu":
        return None
    from . import kernels

    return kernels if kernels.applies(scores, n) else None


def prune_lowest_slices(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """``_prune_lowest(scores, k, dim)`` for 2-D scores (``dim`` 1: rows, 0: columns). Rows on the CPU: compiled,
    one slice at a time in cache. Otherwise all thresholds first, one comparison for the whole mask, and the
    exact tie path only where a slice's k-th equals its (k+1)-th."""
    n = scores.shape[dim]
    if 0 < k < n and scores.numel() and dim == 1 and (kernels := _kernels(scores, n)):
        keep, nan = kernels.prune_lowest_rows(scores, k)
        if nan.numel():  # NaN rows: the definition
            keep.index_copy_(0, nan, _prune_lowest(scores.index_select(0, nan), k, 1))
        return keep
    keep = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    if k <= 0 or k >= n or not scores.numel():
        return keep.fill_(k <= 0)
    kth, sure = _slice_thresholds(scores, k, dim)
    torch.gt(scores, kth, out=keep)
    unsure = (~sure).nonzero().squeeze(1)
    if unsure.numel():
        _settle_ties(scores, keep, k, dim, unsure)
    return keep


def _settle_ties(scores: torch.Tensor, keep: torch.Tensor, k: int, dim: int, unsure: torch.Tensor) -> None:
    """Of the ``unsure`` slices (their threshold is the exact k-th smallest), those that kept fewer than
    ``n - k`` have ties at the threshold: redo them with the exact definition, a chunk of slices at a time."""
    n = scores.shape[dim]
    for part in unsure.split(max(1, CHUNK // n)):
        tied = part[_count(keep.index_select(1 - dim, part), dim).flatten() != n - k]
        if tied.numel():
            keep.index_copy_(1 - dim, tied, _prune_lowest(scores.index_select(1 - dim, tied), k, dim))


# The whole-layer (and cross-layer) selection works on ``parts``: 1-D score tensors, one per layer, taken in
# order as if concatenated, a chunk at a time and never copied whole. Thresholds are compared as 1-element
# tensors of the parts' common dtype: a 0-d float32 threshold would be rounded to a half-precision part's dtype.


def _at(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 0-d threshold as a 1-element tensor on ``like``'s device (see above)."""
    return t.reshape(1).to(like.device)


def _sample(parts: list[torch.Tensor], dtype: torch.dtype, size: int) -> torch.Tensor:
    """``size`` scores of ``parts`` (taken as one) at random positions read in ascending order, on the CPU as
    ``dtype``; every score if there are no more. Random, not a stride: a stride can alias with the columns of a
    structured matrix."""
    n = sum(p.numel() for p in parts)
    if n <= size:
        return torch.cat([p.to("cpu", dtype) for p in parts])
    at = torch.randint(n, (size,), generator=torch.Generator().manual_seed(0))
    at, start, sample = torch.from_numpy(np.sort(at.numpy())), 0, []  # numpy's sort: several times torch's
    for p in parts:
        mine = at[(at >= start) & (at < start + p.numel())] - start
        sample, start = [*sample, p.index_select(0, mine.to(p.device)).to("cpu", dtype)], start + p.numel()
    return torch.cat(sample)


def _spread(s: int, q: float) -> float:
    """Half the width, in sample ranks, of a bracket around quantile ``q`` of a sample of ``s`` that almost surely
    holds the population's: 4 standard deviations of the sample rank, plus one."""
    return 4 * math.sqrt(s * q * (1 - q)) + 1


def _bracket_flat(parts: list[torch.Tensor], k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Values ``lo <= hi`` that almost surely enclose ranks ``k`` and ``k + 1`` of the scores: a sample's order
    statistics 4 standard deviations either side. Exact when the sample is every score."""
    n, sample = sum(p.numel() for p in parts), _sample(parts, dtype, SAMPLE)
    s, q = sample.numel(), k / n
    spread = _spread(s, q)
    lo_rank, hi_rank = math.floor(q * s - spread), math.ceil(q * s + spread) + 1
    inf = torch.tensor(math.inf, dtype=dtype)
    lo = sample.kthvalue(lo_rank).values if lo_rank >= 1 else -inf
    hi = sample.kthvalue(hi_rank).values if hi_rank <= s else inf
    return lo, hi


def _buffers(chunks: list[torch.Tensor]) -> dict[torch.device, torch.Tensor]:
    """Two bool rows as long as the longest chunk, rounded up to whole int64 words, per device of the chunks."""
    size = -(-max(c.numel() for c in chunks) // 8) * 8
    return {c.device: torch.empty(2, size, dtype=torch.bool, device=c.device) for c in chunks}


def _flat_candidates(chunks: list[torch.Tensor], lo: torch.Tensor, hi: torch.Tensor):
    """One pass: how many scores lie below ``lo``, how many in ``[lo, hi]``, and those (index order, on the CPU),
    or ``None`` when ``lo == hi`` (all equal: nothing to gather) or more than ``CHUNK // 16`` are. Whole-chunk
    counts of bool are fast (unlike per-slice ones, see ``_count_le``)."""
    below, inside, values, gather, bufs = 0, 0, [], bool(lo < hi), _buffers(chunks)
    for c in chunks:
        n = c.numel()
        b, i = bufs[c.device][:, : -(-n // 8) * 8]
        i[n:].zero_()  # whole words for ``_marked``
        n_below = int(torch.lt(c, _at(lo, c), out=b[:n]).count_nonzero())
        n_upto = int(torch.le(c, _at(hi, c), out=i[:n]).count_nonzero())
        below, inside = below + n_below, inside + n_upto - n_below
        gather = gather and inside <= CHUNK // 16
        if gather:  # lo <= x <= hi: up to hi and not below lo
            torch.logical_xor(i[:n], b[:n], out=i[:n])
            values.append(c.index_select(0, _marked(i)).to("cpu", lo.dtype))
    return below, inside, torch.cat(values) if gather else None


def _float_key(v: float, wide: bool) -> int:
    """A float's bits (float64's if ``wide``, else float32's) as an integer in the floats' order."""
    bits = struct.unpack("<q" if wide else "<i", struct.pack("<d" if wide else "<f", v))[0]
    return bits if bits >= 0 else bits ^ ((1 << (63 if wide else 31)) - 1)


def _key_float(key: int, wide: bool) -> float:
    """The inverse of ``_float_key``."""
    bits = key if key >= 0 else key ^ ((1 << (63 if wide else 31)) - 1)
    return struct.unpack("<d" if wide else "<f", struct.pack("<q" if wide else "<i", bits))[0]


def _kth_by_bisection(chunks: list[torch.Tensor], k: int, lo: torch.Tensor, hi: torch.Tensor):
    """The k-th smallest in ``[lo, hi]`` and how many scores are ``<=`` it, by bisecting the floats between with
    counting passes (at most 32, 64 for float64): slow, but bounded memory whatever the ties."""
    wide, bufs = lo.dtype == torch.float64, _buffers(chunks)

    def at_most(key: int) -> int:
        t = torch.tensor(_key_float(key, wide), dtype=lo.dtype)
        return sum(int(torch.le(c, _at(t, c), out=bufs[c.device][0, : c.numel()]).count_nonzero()) for c in chunks)

    a, b = _float_key(float(lo), wide), _float_key(float(hi), wide)
    while a < b:
        mid = (a + b) // 2
        a, b = (a, mid) if at_most(mid) >= k else (mid + 1, b)
    return torch.tensor(_key_float(a, wide), dtype=lo.dtype), at_most(a)


def _kth_smallest(parts: list[torch.Tensor], k: int) -> tuple[torch.Tensor, int]:
    """The exact k-th smallest of the scores (``0 < k < n``, a 0-d CPU tensor of their common dtype) and how
    many are ``<=`` it: count what lies below a sampled bracket, then ``kthvalue`` over the few scores inside
    it. Bisection where the bracket missed (improbable) or is crowded with ties."""
    dtype, chunks = reduce(torch.promote_types, (p.dtype for p in parts)), [c for p in parts for c in p.split(CHUNK)]
    lo, hi = _bracket_flat(parts, k, dtype)
    below, inside, values = _flat_candidates(chunks, lo, hi)
    if not below < k <= below + inside:
        return _kth_by_bisection(chunks, k, torch.tensor(-math.inf, dtype=dtype), torch.tensor(math.inf, dtype=dtype))
    if values is None:
        return (lo, below + inside) if lo == hi else _kth_by_bisection(chunks, k, lo, hi)
    kth = values.kthvalue(k - below).values
    return kth, below + int(_count(values <= kth, 0))


def prune_lowest_parts(parts: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """``_prune_lowest`` over 1-D ``parts`` taken as one: one ``part > kth`` comparison each, then, only if ties
    meet the threshold, the first of them in index order are pruned, chunk by chunk. On the CPU, compiled: one
    pass writes the mask and gathers the few scores near the threshold, which are then settled alone."""
    keep = [torch.empty(p.shape, dtype=torch.bool, device=p.device) for p in parts]
    if k <= 0 or k >= sum(p.numel() for p in parts):
        return [m.fill_(k <= 0) for m in keep]
    if all(_kernels(p, 0) for p in parts) and _settle_flat(parts, keep, k):
        return keep
    kth, at_most_kth = _kth_smallest(parts, k)
    for p, m in zip(parts, keep):
        torch.gt(p, _at(kth, p), out=m)
    if at_most_kth > k:
        pairs = [pair for p, m in zip(parts, keep) for pair in zip(p.split(CHUNK), m.split(CHUNK))]
        _keep_later_ties(pairs, kth, at_most_kth - k)
    return keep


def _settle_flat(parts: list[torch.Tensor], keep: list[torch.Tensor], k: int) -> bool:
    """The compiled whole-layer selection, two passes: the first counts 8 thresholds taken from a random sample,
    which bracket the k-th in ``[lo, hi]``; the second writes ``keep = score > hi`` and gathers the scores inside
    the bracket with their positions (ascending). The k-th is found among those, and they alone are then kept or
    pruned (ties: the first in position order go). False, leaving ``keep`` to be rewritten, where the bracket
    missed, held too many, or a score is NaN."""
    from . import kernels

    chunks, outs = [c for p in parts for c in p.split(CHUNK)], [c for m in keep for c in m.split(CHUNK)]
    edges = _sample_edges(parts, k, 8)
    at_most, nan = kernels.count_flat8(chunks, edges)
    if nan:
        return False
    j = sum(c < k for c in at_most)  # the k-th lies in (edges[j - 1], edges[j]]
    lo = float(np.nextafter(np.float32(edges[j - 1]), np.float32(math.inf))) if j else -math.inf
    hi = edges[j] if j < len(edges) else math.inf
    below, inside, values, positions, nan = kernels.mask_flat(chunks, outs, lo, hi)
    if nan or values is None or not below < k <= below + inside:
        return False
    kth = values.kthvalue(k - below).values
    ties = (values == kth).nonzero().squeeze(1)
    pruned_ties = k - below - int(_count(values < kth, 0))
    stay = torch.cat([positions[values > kth], positions[ties[pruned_ties:]]])
    start = 0
    for m in keep:
        mine = stay[(stay >= start) & (stay < start + m.numel())] - start
        m.view(-1).index_fill_(0, mine, True)
        start += m.numel()
    return True


def _sample_edges(parts: list[torch.Tensor], k: int, count: int) -> list[float]:
    """``count`` ascending float32 values across the bracket of rank ``k`` that a random sample of
    ``KERNEL_SAMPLE`` scores gives (4 standard deviations either side), at the sample's own order statistics."""
    n, sample = sum(p.numel() for p in parts), _sample(parts, torch.float32, KERNEL_SAMPLE).detach()
    sample = torch.from_numpy(np.sort(sample.numpy()))  # numpy's sort: several times torch's
    s, q = sample.numel(), k / n
    spread = _spread(s, q)
    return sample[torch.linspace(q * s - spread, q * s + spread, count).round().long().clamp(0, s - 1)].tolist()


def prune_lowest_flat(flat: torch.Tensor, k: int) -> torch.Tensor:
    """``_prune_lowest(flat, k, dim=0)`` for a 1-D tensor, in bounded memory."""
    return prune_lowest_parts([flat], k)[0]


def _keep_later_ties(pairs: list[tuple[torch.Tensor, torch.Tensor]], kth: torch.Tensor, spare: int) -> None:
    """Of the scores equal to ``kth`` (all pruned so far), keep the last ``spare`` in index order."""
    ties = [int(_count(chunk == _at(kth, chunk), 0)) for chunk, _ in pairs]
    to_prune = sum(ties) - spare
    for (chunk, out), count in zip(pairs, ties):
        if count and to_prune <= 0:
            out |= chunk == _at(kth, chunk)
        elif count and to_prune < count:
            equal = chunk == _at(kth, chunk)
            out |= equal & (equal.cumsum(0) > to_prune)
        to_prune -= count


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


def _selection_network(m: int, k: int) -> list[tuple[int, int, bool, bool]]:
    """The comparators of ``sorting_network(m)`` that order statistics ``k - 1`` and ``k`` (from 0) depend on, each
    with whether its min and its max are used: for 2:4, 8 elementwise min/max instead of the full sort's 10."""
    needed, ops = {k - 1, k}, []
    for i, j in reversed(sorting_network(m)):
        if i in needed or j in needed:
            ops.append((i, j, i in needed, j in needed))
            needed |= {i, j}
    return ops[::-1]


def _order_stats(blocks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, m]`` -> the k-th and (k+1)-th smallest of each block, by elementwise min/max over its lanes, which
    beats ``sort``/``topk``/``kthvalue`` along a dimension of size ``m`` (per-slice overhead)."""
    v = list(blocks.unbind(1))
    for i, j, use_min, use_max in _selection_network(blocks.shape[1], k):
        v[i], v[j] = (torch.minimum(v[i], v[j]) if use_min else v[i]), (torch.maximum(v[i], v[j]) if use_max else v[j])
    return v[k - 1], v[k]


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


def _prune_lowest_blocks(blocks: torch.Tensor, k: int, keep: torch.Tensor) -> None:
    """``keep = _prune_lowest(blocks, k, dim=1)`` for small blocks: what is above the k-th order statistic;
    blocks where the k-th equals the (k+1)-th (a tie at the threshold) are ranked exactly."""
    kth, after = _order_stats(blocks, k)
    torch.gt(blocks, kth.unsqueeze(1), out=keep)
    tied = (kth == after).nonzero().squeeze(1)
    if tied.numel():
        keep.index_copy_(0, tied, _stable_ranks(blocks.index_select(0, tied)) >= k)


def select_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive scores along the input dimension (ties: the lower
    index is pruned first). Small ``m`` sorts blocks with a network; large ``m`` uses the row path on blocks."""
    rows, cols = scores.shape
    check_nm(cols, (n, m))
    if m <= NM_NETWORK_MAX and scores.numel() and (kernels := _kernels(scores, m)):
        keep, nan = kernels.prune_lowest_blocks(scores, m - n, m)
        if nan.numel():  # rows holding a NaN: as on other devices
            redone = torch.empty(nan.numel() * cols // m, m, dtype=torch.bool)
            _prune_lowest_blocks(scores.index_select(0, nan).reshape(-1, m), m - n, redone)
            keep.index_copy_(0, nan, redone.view(-1, cols))
        return keep
    keep = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    step = max(1, CHUNK // max(cols, 1))
    for start in range(0, rows, step):
        blocks, out = scores[start : start + step].reshape(-1, m), keep[start : start + step].view(-1, m)
        if m <= NM_NETWORK_MAX:
            _prune_lowest_blocks(blocks, m - n, out)
        else:
            out.copy_(prune_lowest_slices(blocks, m - n, 1))
    return keep
