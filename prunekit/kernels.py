"""Compiled CPU kernels for mask selection (numba): one pass over memory where torch needs several.

A torch selection on the CPU makes several passes over a layer's scores (counts against a guess, a bracket,
the final comparison), each writing a full-size temporary. These kernels bring a row into cache once, find its
k-th smallest there with a few vectorized counting passes and write its mask; rank N:M blocks in one pass; and
select over a whole layer in two passes (count, then mask and gather). Selecting then costs about what
computing the scores does. They release the GIL and run on ``torch.get_num_threads()`` threads.

Every kernel answers exactly as ``selection._prune_lowest`` (a stable sort: among equal scores the lower index
goes first). Slices holding a NaN are reported back for the torch path to redo. ``available()`` is False when
numba is missing or inside ``enabled(False)`` (the ``kernels`` setting of ``PruneConfig``, which the engine applies
to each pruning step): ``selection`` then uses torch alone, with the same masks.

Compiled code is cached on disk per user (``$XDG_CACHE_HOME/prunekit/numba``, or numba's own ``NUMBA_CACHE_DIR``
when set), never inside the installed package, which is read-only or shared in many installs.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar

import numpy as np
import torch

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; without it selection is only slower
    numba = None

# Scores sampled per slice (sorted) for its first two thresholds, SPREAD standard deviations either side of k.
SAMPLE = 32
SPREAD = 2.0
# Later thresholds sit DELTA * (scores between the bounds) either side of k, by linear interpolation.
DELTA = 0.1
# Scores left between the bounds when they are gathered and sorted.
FINISH = 16
# Scores a thread works on per task: enough to pay for the task, few enough to balance the threads.
TASK = 1 << 20
# Scores converted to float32 at a time (half-precision scores; float32 ones are used in place).
CHUNK = 1 << 23


_ENABLED: ContextVar[bool] = ContextVar("prunekit_kernels", default=True)


def available() -> bool:
    """Whether the compiled kernels can be used (numba importable and not switched off)."""
    return numba is not None and _ENABLED.get()


@contextlib.contextmanager
def enabled(on: bool) -> Iterator[None]:
    """The kernels switched on or off for the body (this thread and context only)."""
    token = _ENABLED.set(on)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def applies(scores: torch.Tensor, n: int) -> bool:
    """Whether these kernels take ``scores`` competing in slices of ``n``: on the CPU, float32/16/bfloat16
    (compared as float32, exactly), ``n`` below 2^24 (counts are float32 sums)."""
    return (
        available()
        and scores.device.type == "cpu"
        and scores.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and n < 1 << 24
    )


def _jit(fn):
    """Compiled without the GIL, cached on disk per user; float sums may be reassociated (so that they
    vectorize): they only ever add 0/1 flags, exact in float32 below 2^24 (``applies`` keeps slices shorter)."""
    if numba is None:
        return fn
    with _user_cache():
        return numba.njit(nogil=True, cache=True, fastmath={"reassoc"})(fn)


def user_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "prunekit", "numba")


@contextlib.contextmanager
def _user_cache() -> Iterator[None]:
    """numba picks a function's cache folder when it is decorated: there, and only there, point it to the user's
    cache (unless the user chose one with ``NUMBA_CACHE_DIR``), so no other numba user in the process is moved."""
    config = numba.core.config
    chosen = config.CACHE_DIR
    if not chosen:
        config.CACHE_DIR = user_cache_dir()
    try:
        yield
    finally:
        config.CACHE_DIR = chosen


@_jit
def _sort_small(a, m):  # pragma: no cover - compiled
    """Insertion sort of ``a[:m]`` (a few dozen values: no call, no allocation)."""
    for i in range(1, m):
        v, j = a[i], i - 1
        while j >= 0 and a[j] > v:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = v


@_jit
def _sort(a, m):  # pragma: no cover - compiled
    """``a[:m]`` sorted in place: insertion sort for the usual few, numba's quicksort past 64."""
    if m <= 64:
        _sort_small(a, m)
    else:
        a[:m].sort()


@_jit
def _inside(lo, hi, t):  # pragma: no cover - compiled
    """``t`` moved strictly inside ``(lo, hi)`` if it is not."""
    if t <= lo:
        t = np.nextafter(lo, np.float32(np.inf))
    if t >= hi:
        t = np.nextafter(hi, np.float32(-np.inf))
    return t


@_jit
def _first_pair(sample, s, k, n):  # pragma: no cover - compiled
    """Two thresholds either side of rank ``k`` of ``n`` read off a sorted sample of ``s``."""
    q = k / n
    spread = SPREAD * math.sqrt(s * q * (1.0 - q)) + 1.0
    ja, jb = int(math.floor(q * s - 0.5 - spread)), int(math.ceil(q * s - 0.5 + spread))
    a = sample[ja] if ja >= 0 else np.float32(-np.inf)
    b = sample[jb] if jb < s else np.float32(np.inf)
    return a, b


@_jit
def _narrow(lo, hi, c_lo, c_hi, a, ca, b, cb, k):  # pragma: no cover - compiled
    """The bounds ``lo < kth <= hi`` (``#(x <= lo) = c_lo < k <= c_hi = #(x <= hi)``) after counting ``a <= b``."""
    if ca >= k:
        if a < hi:
            hi, c_hi = a, ca
    elif a > lo:
        lo, c_lo = a, ca
    if cb >= k:
        if b < hi:
            hi, c_hi = b, cb
    elif b > lo:
        lo, c_lo = b, cb
    return lo, hi, c_lo, c_hi


@_jit
def _next_pair(lo, hi, c_lo, c_hi, k, low, high):  # pragma: no cover - compiled
    """Two thresholds either side of rank ``k`` by linear interpolation between the bounds (``low``/``high``
    stand in for an infinite bound: the sample's ends), or ``ok`` False when no float lies between the bounds."""
    left = lo if lo > -np.inf else min(low, hi)
    right = hi if hi < np.inf else max(high, lo)
    if not right > left:
        if lo > -np.inf and hi < np.inf:
            return lo, hi, False
        if lo == -np.inf:
            left = right - abs(right) - np.float32(1)
        else:
            right = left + abs(left) + np.float32(1)
    span = c_hi - c_lo
    delta, scale = DELTA * span + 1.0, (right - left) / span
    a = _inside(lo, hi, np.float32(left + (k - 0.5 - delta - c_lo) * scale))
    b = _inside(a, hi, np.float32(left + (k - 0.5 + delta - c_lo) * scale)) if a < hi else a
    return a, b, True


@_jit
def _finish(cand, m, k, c_lo, hi, c_hi):  # pragma: no cover - compiled
    """From the ``m`` gathered scores in ``(lo, hi]`` of a slice with ``c_lo`` scores ``<= lo`` and ``c_hi``
    ``<= hi``: the k-th smallest, how many equal to it are pruned and whether some equal to it stay."""
    if hi == -np.inf:  # the k-th is -inf: nothing lies below it
        return hi, k, k < c_hi
    _sort(cand, m)
    kth = cand[max(0, min(k - c_lo - 1, m - 1))]
    less, equal = c_lo, 0
    for i in range(m):
        less += cand[i] < kth
        equal += cand[i] == kth
    return kth, k - less, k - less < equal


# ---- one slice at a time (rows) -------------------------------------------------------------------------------


@_jit
def _count_le2(row, a, b):  # pragma: no cover - compiled
    """How many of ``row`` are ``<= a`` and ``<= b``: one vectorized pass (two counts cost about one)."""
    ca, cb = np.float32(0), np.float32(0)  # float32: integer sums widen to int64 and run at half the speed
    for i in range(row.shape[0]):
        v = row[i]
        ca += np.float32(v <= a)
        cb += np.float32(v <= b)
    return int(ca), int(cb)


@_jit
def _gather(row, lo, hi, cand):  # pragma: no cover - compiled
    """The scores in ``(lo, hi]`` into ``cand``: how many, and how many are ``<= lo`` (exact even where ``lo``
    stands for "below everything" and is -inf). A vectorized count per run of 64 first: only the few runs
    holding any are compacted."""
    n, m, low = row.shape[0], 0, 0
    for start in range(0, n, 64):
        end, hits, below = min(start + 64, n), np.float32(0), np.float32(0)
        for i in range(start, end):
            v = row[i]
            below += np.float32(v <= lo)
            hits += np.float32((v > lo) & (v <= hi))
        low += int(below)
        if hits:
            for i in range(start, end):
                v = row[i]
                cand[m] = v
                m += (v > lo) & (v <= hi)
    return m, low


@_jit
def _row_kth(row, k, cand, sample):  # pragma: no cover - compiled
    """One slice's k-th smallest (``0 < k < n``), how many equal to it are pruned, whether some equal to it stay.

    Keeps bounds ``lo < kth <= hi`` with exact counts; each pass over the slice (in cache) counts two thresholds
    placed either side of rank ``k``, first from a sorted strided sample, then by interpolating between the
    bounds, until a few scores lie between; those are gathered and sorted. NaN counts nowhere: the answer is
    then meaningless and ``_write_row`` reports the NaN."""
    n, s = row.shape[0], sample.shape[0]
    step = n // s
    for i in range(s):
        sample[i] = row[i * step + (step >> 1)]
    _sort_small(sample, s)
    a, b = _first_pair(sample, s, k, n)
    lo, hi, c_lo, c_hi = np.float32(-np.inf), np.float32(np.inf), 0, n
    for _ in range(64):
        ca, cb = _count_le2(row, a, b)
        lo, hi, c_lo, c_hi = _narrow(lo, hi, c_lo, c_hi, a, ca, b, cb, k)
        if c_hi - c_lo <= FINISH:
            break
        a, b, ok = _next_pair(lo, hi, c_lo, c_hi, k, sample[0], sample[s - 1])
        if not ok:
            break
    m, c_lo = _gather(row, lo, hi, cand)
    return _finish(cand, m, k, c_lo, hi, c_hi)


@_jit
def _write_row(row, kth, prune, keep_some, out):  # pragma: no cover - compiled
    """``out = row > kth``, except that of the scores equal to ``kth`` the first ``prune`` go and the rest stay.
    Returns whether the row holds a NaN (``out`` is then wrong: the caller redoes the row)."""
    n, nan = row.shape[0], np.float32(0)
    if not keep_some:
        for i in range(n):
            v = row[i]
            out[i] = v > kth
            nan += np.float32(v != v)
        return nan > 0
    for i in range(n):
        v = row[i]
        nan += np.float32(v != v)
        if v == kth and prune > 0:
            out[i] = False
            prune -= 1
        else:
            out[i] = v >= kth
    return nan > 0


@_jit
def _rows(x, k, keep, nan, r0, r1):  # pragma: no cover - compiled
    """Per-row selection for rows ``[r0, r1)`` of ``x`` (C-contiguous float32)."""
    n = x.shape[1]
    cand = np.empty(n, np.float32)
    sample = np.empty(min(SAMPLE, n), np.float32)
    for r in range(r0, r1):
        kth, prune, keep_some = _row_kth(x[r], k, cand, sample)
        nan[r] = _write_row(x[r], kth, prune, keep_some, keep[r])


# ---- N:M ------------------------------------------------------------------------------------------------------


@_jit
def _blocks(x, n_prune, m, keep, nan, r0, r1):  # pragma: no cover - compiled
    """N:M for rows ``[r0, r1)``: in each block of ``m`` consecutive scores, those whose stable rank (lower index
    first among equals) is at least ``n_prune`` stay. Rows holding a NaN are flagged in ``nan``."""
    cols = x.shape[1]
    for r in range(r0, r1):
        row, out, bad = x[r], keep[r], np.float32(0)
        for b in range(0, cols, m):
            for i in range(m):
                v = row[b + i]
                bad += np.float32(v != v)
                rank = np.int32(0)
                for j in range(m):
                    u = row[b + j]
                    rank -= np.int32(-((u < v) | ((u == v) & (j < i))))
                out[b + i] = rank >= n_prune
        nan[r] = bad > 0


@_jit
def _blocks4(x, n_prune, keep, nan, r0, r1):  # pragma: no cover - compiled
    """``_blocks`` for ``m = 4``: six comparisons of a block give every stable rank (float32 flags: they vectorize;
    ``1 - (q < p)`` is ``p <= q`` but for NaN, whose rows are redone)."""
    n_prune = np.float32(n_prune)
    for r in range(r0, r1):
        row, out, bad = x[r], keep[r], np.float32(0)
        for b in range(0, x.shape[1] // 4):
            p, q, u, v = row[4 * b], row[4 * b + 1], row[4 * b + 2], row[4 * b + 3]
            qp, up, vp = np.float32(q < p), np.float32(u < p), np.float32(v < p)
            uq, vq, vu = np.float32(u < q), np.float32(v < q), np.float32(v < u)
            out[4 * b] = qp + up + vp >= n_prune
            out[4 * b + 1] = (1 - qp) + uq + vq >= n_prune
            out[4 * b + 2] = (1 - up) + (1 - uq) + vu >= n_prune
            out[4 * b + 3] = (1 - vp) + (1 - vq) + (1 - vu) >= n_prune
            bad += np.float32((p != p) | (q != q) | (u != u) | (v != v))
        nan[r] = bad > 0


# ---- a whole layer, or several ------------------------------------------------------------------------------


@_jit
def _count_flat8(x, t, a, b):  # pragma: no cover - compiled
    """For ``x[a:b]``: how many are ``<= t[j]`` for each of the 8 thresholds ``t``, and how many are NaN; one
    vectorized pass (named accumulators: an array of them would not stay in registers)."""
    x = x[a:b]  # indices from 0: see ``_mask_flat``
    t0, t1, t2, t3, t4, t5, t6, t7 = t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]
    counts = np.zeros(9, np.int64)
    for start in range(0, b - a, 4096):
        c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = np.float32(0)
        for i in range(start, min(start + 4096, b - a)):
            v = x[i]
            c0 += np.float32(v <= t0)
            c1 += np.float32(v <= t1)
            c2 += np.float32(v <= t2)
            c3 += np.float32(v <= t3)
            c4 += np.float32(v <= t4)
            c5 += np.float32(v <= t5)
            c6 += np.float32(v <= t6)
            c7 += np.float32(v <= t7)
            c8 += np.float32(v != v)
        for j, c in enumerate((c0, c1, c2, c3, c4, c5, c6, c7, c8)):
            counts[j] += int(c)
    return counts


@_jit
def _mask_flat(x, lo, hi, keep, cand, pos, a, b):  # pragma: no cover - compiled
    """For ``x[a:b]``: writes ``keep = x > hi``, gathers the scores in ``[lo, hi]`` and their positions into
    ``cand``/``pos`` while they have room (their length less 16), and counts what lies below ``lo``, in
    ``[lo, hi]``, and NaN. Runs of 256, then of 16, are counted first (vectorized); only runs of 16 holding
    candidates are compacted."""
    x, keep = x[a:b], keep[a:b]  # indices from 0: no negative-index wrap in the loops, which then vectorize
    n, below, inside, nan, room = b - a, 0, 0, 0, cand.shape[0] - 16
    for start in range(0, n, 256):
        end, n_below, hits, n_nan = min(start + 256, n), np.float32(0), np.float32(0), np.float32(0)
        for i in range(start, end):
            v = x[i]
            keep[i] = v > hi
            n_below += np.float32(v < lo)
            hits += np.float32((v >= lo) & (v <= hi))
            n_nan += np.float32(v != v)
        below, nan = below + int(n_below), nan + int(n_nan)
        if not hits:
            continue
        if inside + hits > room:
            inside += int(hits)
            continue
        for run in range(start, end, 16):
            last, some = min(run + 16, end), np.float32(0)
            for i in range(run, last):
                v = x[i]
                some += np.float32((v >= lo) & (v <= hi))
            if some:
                for i in range(run, last):
                    v = x[i]
                    cand[inside] = v
                    pos[inside] = a + i
                    inside += (v >= lo) & (v <= hi)
    return below, inside, nan


# ---- threads --------------------------------------------------------------------------------------------------

_POOL: tuple[ThreadPoolExecutor, int, int] | None = None  # the pool, its size, the process that made it
_POOL_LOCK = threading.Lock()


def _run(fn, spans: list[tuple[int, int]]) -> list:
    """``fn(start, end)`` for every span, on ``torch.get_num_threads()`` threads (the kernels release the GIL)."""
    threads = torch.get_num_threads()
    if threads == 1 or len(spans) == 1:
        return [fn(a, b) for a, b in spans]
    return list(_pool(threads).map(lambda span: fn(*span), spans))


def _pool(threads: int) -> ThreadPoolExecutor:
    """The worker pool, remade (under a lock: selections may run in several threads) when the thread count changes
    or in a forked child (threads do not survive a fork); a replaced pool is shut down once its work is done."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and _POOL[1:] == (threads, os.getpid()):
            return _POOL[0]
        old = _POOL
        _POOL = ThreadPoolExecutor(threads, thread_name_prefix="prunekit-select"), threads, os.getpid()
        if old is not None and old[2] == os.getpid():
            old[0].shutdown(wait=False)
        return _POOL[0]


def _spans(total: int, per: int) -> list[tuple[int, int]]:
    """``[0, total)`` cut into runs of about ``per``, at least one per thread."""
    per = max(1, min(per, -(-total // torch.get_num_threads())))
    return [(a, min(a + per, total)) for a in range(0, total, per)]


def _f32(t: torch.Tensor) -> np.ndarray:
    """A float32 C-contiguous numpy view (a copy only for half precision or strides: the values compare alike),
    also of scores that carry autograd history (``weight.abs()`` outside ``no_grad``)."""
    return t.detach().float().contiguous().numpy()


# ---- entry points ---------------------------------------------------------------------------------------------


def _by_rows(fn, scores: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(x, *args, keep, nan, r0, r1)`` over the rows of 2-D CPU scores, a chunk of rows at a time (converted
    to float32 one chunk at a time), threads splitting each chunk; the keep mask and the NaN rows' indices."""
    keep = torch.empty(scores.shape, dtype=torch.bool)
    nan = torch.zeros(scores.shape[0], dtype=torch.bool)
    step = max(1, CHUNK // max(1, scores.shape[1]))
    for start in range(0, scores.shape[0], step):
        x, out, bad = (t[start : start + step] for t in (scores, keep, nan))
        x, out, bad = _f32(x), out.numpy(), bad.numpy()
        _run(lambda a, b, x=x, out=out, bad=bad: fn(x, *args, out, bad, a, b), _spans(len(x), TASK // x.shape[1]))
    return keep, nan.nonzero().squeeze(1)


def prune_lowest_rows(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``selection._prune_lowest(scores, k, 1)`` for 2-D CPU scores, ``0 < k < cols``, and the indices of rows
    holding a NaN (their mask is wrong: the caller redoes them)."""
    return _by_rows(_rows, scores, k)


def prune_lowest_blocks(scores: torch.Tensor, n_prune: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N:M keep mask (``n_prune = M - N`` of every ``m`` pruned) for 2-D CPU scores, and the indices of rows
    holding a NaN (their mask is wrong: the caller redoes them)."""
    if m == 4:
        return _by_rows(_blocks4, scores, n_prune)
    return _by_rows(_blocks, scores, n_prune, m)


def count_flat8(chunks: list[torch.Tensor], thresholds: list[float]) -> tuple[list[int], int]:
    """Over 1-D CPU score chunks: how many scores are ``<=`` each of 8 ascending thresholds, and how many are NaN."""
    t, total = np.asarray(thresholds, np.float32), np.zeros(9, np.int64)
    for c in chunks:
        x = _f32(c)
        for counts in _run(lambda a, b, x=x: _count_flat8(x, t, a, b), _spans(len(x), TASK)):
            total += counts
    return [int(c) for c in total[:8]], int(total[8])


def mask_flat(chunks: list[torch.Tensor], keeps: list[torch.Tensor], lo: float, hi: float):
    """Over 1-D CPU score chunks taken as one, with their bool ``keeps``: writes ``keep = score > hi`` and returns
    how many scores lie below ``lo``, how many in ``[lo, hi]``, those (float32) with their positions in the
    concatenation (ascending), and whether any score is NaN. Values and positions are ``None`` where more than
    1/8 of a thread's scores are in the bracket (too crowded to gather)."""
    below, inside, nan, values, positions, offset, crowded = 0, 0, 0, [], [], 0, False
    lo32, hi32 = np.float32(lo), np.float32(hi)
    for c, k in zip(chunks, keeps):
        x, out = _f32(c), k.numpy()
        spans = _spans(len(x), TASK)
        bufs = {a: (np.empty((b - a) // 8 + 32, np.float32), np.empty((b - a) // 8 + 32, np.int64)) for a, b in spans}
        counts = _run(lambda a, b, x=x, out=out, bufs=bufs: _mask_flat(x, lo32, hi32, out, *bufs[a], a, b), spans)
        for (n_below, n_inside, n_nan), (cand, pos) in zip(counts, bufs.values()):
            below, inside, nan = below + n_below, inside + n_inside, nan + n_nan
            crowded |= n_inside > len(cand) - 16
            if not crowded:
                values.append(cand[:n_inside])
                positions.append(pos[:n_inside] + offset)
        offset += len(x)
    if crowded:
        return below, inside, None, None, nan > 0
    return below, inside, torch.from_numpy(np.concatenate(values)), torch.from_numpy(np.concatenate(positions)), nan > 0
