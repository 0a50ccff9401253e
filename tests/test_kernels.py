"""The compiled CPU selection kernels answer exactly as a stable sort, on the distributions that defeat a sampled
guess or an interpolation: heavy tails, far-apart clusters, adjacent floats, ties, infinities, NaN."""

import math
import os

import pytest
import torch

from prunekit import kernels
from prunekit.groups import select_mask
from prunekit.selection import _prune_lowest, _prune_lowest_blocks, select_nm
from tests.test_groups import _stable_sort_mask, switch_kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba missing")


def _scores(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen)
    if kind == "heavy-tailed":
        return (x * 6).exp()
    if kind == "clusters":  # two groups 1e6 apart: interpolating between the bounds lands in the empty gap
        return torch.where(torch.rand(rows, cols, generator=gen) < 0.5, x, x + 1e6)
    if kind == "adjacent-floats":  # every score one of a few neighbouring floats: nothing to split between bounds
        return 1.0 + torch.randint(0, 5, (rows, cols), generator=gen).float() * torch.finfo(torch.float32).eps
    if kind == "rounded":
        return (x * 2).round()
    if kind == "infinite":
        x = torch.where(torch.rand(rows, cols, generator=gen) < 0.2, math.inf, x)
        return torch.where(torch.rand(rows, cols, generator=gen) < 0.2, -math.inf, x)
    if kind == "sorted":  # a strided sample sees the extremes only
        return torch.arange(rows * cols, dtype=torch.float).reshape(rows, cols)
    if kind == "constant":
        return torch.full((rows, cols), -2.5)
    return x.abs() * (torch.rand(cols, generator=gen) + 0.1)  # Wanda-like


KINDS = ["wanda", "heavy-tailed", "clusters", "adjacent-floats", "rounded", "infinite", "sorted", "constant"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cols", [2, 5, 33, 257, 3001])
def test_rows_equal_a_stable_sort(kind, cols):
    scores = _scores(kind, 24, cols, seed=cols)
    for k in sorted({1, cols // 10, cols // 2, cols - cols // 10, cols - 1} - {0}):
        keep, nan = kernels.prune_lowest_rows(scores, k)
        assert nan.numel() == 0
        assert torch.equal(keep, _stable_sort_mask(scores, k, 1)), (kind, cols, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rows_compare_exactly(dtype):
    scores = _scores("wanda", 40, 1000, seed=1).to(dtype)  # many ties once rounded
    keep, _ = kernels.prune_lowest_rows(scores, 600)
    assert torch.equal(keep, _stable_sort_mask(scores.float(), 600, 1))


def test_rows_in_several_chunks_and_threads(monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK", 3 * 500 + 7)  # chunks of 3 rows
    monkeypatch.setattr(kernels, "TASK", 500)  # a task per row
    scores = _scores("rounded", 31, 500, seed=2)
    keep, _ = kernels.prune_lowest_rows(scores, 250)
    assert torch.equal(keep, _stable_sort_mask(scores, 250, 1))


def test_nan_rows_are_reported_and_selection_redoes_them_by_the_definition():
    scores = _scores("wanda", 6, 300, seed=3)
    scores[2, 17] = math.nan
    scores[4] = math.nan
    _, nan = kernels.prune_lowest_rows(scores, 150)
    assert nan.tolist() == [2, 4]
    assert torch.equal(select_mask(scores, 0.5, "per-output"), _prune_lowest(scores, 150, 1))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (5, 16), (2, 6)])
def test_blocks_equal_a_stable_sort(kind, n, m):
    scores = _scores(kind, 9, 12 * m, seed=m)
    keep, nan = kernels.prune_lowest_blocks(scores, m - n, m)
    assert nan.numel() == 0
    assert torch.equal(keep, _stable_sort_mask(scores.reshape(9, 12, m), m - n, 2).reshape(9, 12 * m))


def test_nan_blocks_are_redone_as_on_other_devices():
    scores = _scores("wanda", 5, 64, seed=4)
    scores[1, 9] = math.nan
    _, nan = kernels.prune_lowest_blocks(scores, 2, 4)
    assert nan.tolist() == [1]
    expected = torch.empty(5 * 16, 4, dtype=torch.bool)
    _prune_lowest_blocks(scores.reshape(-1, 4), 2, expected)
    assert torch.equal(select_nm(scores, 2, 4), expected.reshape(5, 64))


@pytest.mark.parametrize("kind", KINDS)
def test_flat_counts_and_mask_with_candidates(kind, monkeypatch):
    monkeypatch.setattr(kernels, "TASK", 3000)  # several threads' spans per chunk
    flat = _scores(kind, 50, 401, seed=5).reshape(-1)
    finite = flat[flat.isfinite()]
    edges = finite.quantile(torch.linspace(0.3, 0.6, 8)).tolist()
    at_most, nan = kernels.count_flat8(list(flat.split(7000)), edges)
    assert at_most == [int((flat <= e).sum()) for e in edges] and nan == 0
    lo, hi = edges[2], edges[3]
    keep = torch.empty(flat.shape, dtype=torch.bool)
    below, inside, values, positions, nan = kernels.mask_flat(list(flat.split(7000)), list(keep.split(7000)), lo, hi)
    between = ((flat >= lo) & (flat <= hi)).nonzero().squeeze(1)
    assert (below, inside, nan) == (int((flat < lo).sum()), between.numel(), False)
    assert torch.equal(keep, flat > hi)
    if values is not None:
        assert torch.equal(positions, between) and torch.equal(values, flat[between])
    else:  # more than 1/8 of a span's scores in the bracket: counted, not gathered
        assert inside > 3000 // 8


@pytest.mark.parametrize("kind", KINDS)
def test_layers_larger_than_the_sample_equal_a_stable_sort(kind):
    scores = _scores(kind, 300, 500, seed=6)  # 150000 scores: more than the sample
    for sparsity in (0.01, 0.5, 0.93):
        k = int(scores.numel() * sparsity)
        expected = _stable_sort_mask(scores.reshape(-1), k, 0).reshape(scores.shape)
        assert torch.equal(select_mask(scores, sparsity, "per-layer"), expected), (kind, sparsity)


@pytest.mark.parametrize("where", ["below", "above", "nan"])
def test_flat_selection_falls_back_when_the_sampled_edges_miss(where, monkeypatch):
    import prunekit.selection as groups

    scores = _scores("wanda", 300, 500, seed=7)
    expected = _stable_sort_mask(scores.reshape(-1), scores.numel() // 2, 0).reshape(scores.shape)
    if where == "nan":  # as the torch path has it, on every device
        scores[3, 4] = math.nan
        switch_kernels(monkeypatch, "0")
        expected = select_mask(scores, 0.5, "per-layer")
        switch_kernels(monkeypatch, "1")
    else:
        edge = float(scores.min()) if where == "below" else float(scores.max())
        monkeypatch.setattr(groups, "_sample_edges", lambda parts, k, count: [edge] * count)
    settled = []
    original = groups._settle_flat
    monkeypatch.setattr(groups, "_settle_flat", lambda *a: settled.append(original(*a)) or settled[-1])
    assert torch.equal(select_mask(scores, 0.5, "per-layer"), expected)
    assert settled == [False]


def test_switched_off_by_the_setting(monkeypatch):
    switch_kernels(monkeypatch, "0")
    assert not kernels.available() and not kernels.applies(torch.zeros(2, 2), 2)
    switch_kernels(monkeypatch, "1")
    assert kernels.applies(torch.zeros(2, 2), 2)
    assert not kernels.applies(torch.zeros(2, 2, dtype=torch.float64), 2)
    assert not kernels.applies(torch.zeros(2, 2), 1 << 24)  # float32 counts are exact below 2^24 only


def test_a_forked_child_selects_on_its_own_threads():
    """The thread pool does not survive a fork: a child process makes its own instead of waiting forever."""
    import multiprocessing

    scores = _scores("wanda", 64, 300, seed=8)
    expected = _stable_sort_mask(scores, 150, 1)
    assert torch.equal(kernels.prune_lowest_rows(scores, 150)[0], expected)  # the parent's pool exists now
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        keep = pool.apply_async(_select_in_child, (scores,)).get(timeout=60)
    assert torch.equal(keep, expected)


def _select_in_child(scores: torch.Tensor) -> torch.Tensor:
    torch.set_num_threads(2)
    return kernels.prune_lowest_rows(scores, 150)[0]


def test_scores_with_autograd_history_select_like_plain_ones():
    weight = torch.nn.Parameter(_scores("wanda", 16, 64, seed=9))
    scores = weight.abs() * 2  # requires grad: no .numpy() without detaching
    plain = scores.detach()
    assert torch.equal(select_mask(scores, 0.5, "per-output"), _stable_sort_mask(plain, 32, 1))
    assert torch.equal(select_nm(scores, 2, 4), _stable_sort_mask(plain.reshape(16, 16, 4), 2, 2).reshape(16, 64))
    assert torch.equal(select_mask(scores, 0.5, "per-layer"), _stable_sort_mask(plain.reshape(-1), 512, 0).view(16, 64))


def test_compiled_code_is_cached_per_user_not_in_the_package(tmp_path):
    """Issue 28 item 9: numba wrote its cache into the installed package's __pycache__ (read-only in many
    installs, shared between users in others)."""
    import subprocess
    import sys

    code = "from prunekit import kernels; print(kernels._rows._cache._cache_path)"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    env.pop("NUMBA_CACHE_DIR", None)
    path = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert path.strip().startswith(str(tmp_path / "prunekit" / "numba"))
    import numba

    assert numba.core.config.CACHE_DIR == os.environ.get("NUMBA_CACHE_DIR", "")  # nobody else's cache moved


def test_the_kernels_setting_switches_them_off_with_the_same_masks(monkeypatch):
    """The setting replaced the PRUNEKIT_KERNELS environment variable: a setting belongs to the config."""
    import prunekit
    from tests.conftest import tiny_llama

    calls = []
    original = kernels.prune_lowest_rows
    monkeypatch.setattr(kernels, "prune_lowest_rows", lambda *a: calls.append(1) or original(*a))
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    on, off = tiny_llama(hidden=64, intermediate=128), tiny_llama(hidden=64, intermediate=128)
    prunekit.prune(on, "wanda", 0.5, calib=ids)
    used = len(calls)
    prunekit.prune(off, "wanda", 0.5, calib=ids, kernels=False)
    assert used > 0 and len(calls) == used
    for a, b in zip(on.parameters(), off.parameters()):
        assert torch.equal(a, b)
