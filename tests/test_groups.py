import pytest
import torch

from prunekit.groups import parse_pattern, select_global, select_mask
from prunekit.selection import select_nm


def test_hand_checkable_per_layer():
    scores = torch.arange(1.0, 9.0).reshape(2, 4)  # weights 1..8, unit inputs
    keep = select_mask(scores, 0.5, "per-layer")
    assert scores[keep].tolist() == [5.0, 6.0, 7.0, 8.0]


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.95])
def test_exact_counts_per_group(sparsity):
    scores = torch.rand(12, 40, generator=torch.Generator().manual_seed(0))
    per_out = select_mask(scores, sparsity, "per-output")
    assert ((~per_out).sum(1) == int(40 * sparsity)).all()
    per_in = select_mask(scores, sparsity, "per-input")
    assert ((~per_in).sum(0) == int(12 * sparsity)).all()
    per_layer = select_mask(scores, sparsity, "per-layer")
    assert (~per_layer).sum() == int(12 * 40 * sparsity)
    # the pruned ones are the lowest: every kept score >= every pruned score in the group
    assert scores[per_layer].min() >= scores[~per_layer].max() if sparsity else True


def test_ties_prune_lower_index_first():
    keep = select_mask(torch.ones(1, 6), 0.5, "per-output")
    assert keep.tolist() == [[False, False, False, True, True, True]]
    keep = select_nm(torch.ones(1, 4), 2, 4)
    assert keep.tolist() == [[False, False, True, True]]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_validity(n, m):
    scores = torch.rand(8, 32, generator=torch.Generator().manual_seed(1))
    keep = select_mask(scores, 0.0, nm=(n, m))
    blocks = keep.reshape(8, -1, m)
    assert (blocks.sum(-1) == n).all()
    # inside each block the kept are the n largest
    s = scores.reshape(8, -1, m)
    assert (s.masked_fill(~blocks, float("inf")).min(-1).values >= s.masked_fill(blocks, -1).max(-1).values).all()


def test_nm_must_divide():
    with pytest.raises(ValueError, match="multiple of 4"):
        select_nm(torch.rand(2, 6), 2, 4)


@pytest.mark.parametrize("bad", ["4:4", "0:4", "5:4", "2-4", "a:b"])
def test_bad_patterns(bad):
    with pytest.raises(ValueError):
        parse_pattern(bad)


def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern(None) is None


def switch_kernels(monkeypatch, on: str) -> None:
    """The compiled kernels on ("1") or off ("0") for one test: the ``kernels`` setting, as the engine applies it."""
    from contextvars import ContextVar

    import prunekit.kernels

    monkeypatch.setattr(prunekit.kernels, "_ENABLED", ContextVar("prunekit_kernels", default=on != "0"))


@pytest.mark.parametrize("kernels", ["1", "0"])
def test_global_selection_compares_mixed_dtypes_as_float32(monkeypatch, kernels):
    """As if every layer were cast to float32 and concatenated (the definition), without the copy: float64 scores
    are rounded first (here into ties with the earlier layer "b"), half-precision ones are exact in float32, and
    a 0-d float32 threshold would be rounded to half precision. Small chunks: many per layer."""
    import prunekit.selection as groups

    switch_kernels(monkeypatch, kernels)
    monkeypatch.setattr(groups, "CHUNK", 100)
    monkeypatch.setattr(groups, "SAMPLE", 50)
    gen = torch.Generator().manual_seed(16)
    base = torch.randn(3, 30, 40, generator=gen).abs()
    scores = {"a": base[0].half(), "b": base[1], "c": base[1].double() - 1e-12, "d": base[0].round().bfloat16()}
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    for sparsity in (0.2, 0.5, 0.8):
        expected = _stable_sort_mask(flat, int(flat.numel() * sparsity), 0).split(1200)
        masks = select_global(scores, sparsity)
        assert all(torch.equal(masks[n], e.reshape(30, 40)) for n, e in zip(scores, expected)), sparsity


def test_global_threshold_across_layers():
    scores = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([[5.0, 6.0, 7.0, 8.0]])}
    masks = select_global(scores, 0.5)
    assert masks["a"].sum() == 0 and masks["b"].all()


def test_unknown_group():
    with pytest.raises(ValueError, match="unknown comparison group"):
        select_mask(torch.rand(2, 2), 0.5, "per-row")


def _stable_sort_mask(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """The definition: prune the first ``k`` of a stable ascending sort."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    order = torch.sort(scores, dim=dim, stable=True).indices
    mask.scatter_(dim, order.narrow(dim, 0, k), False)
    return mask


@pytest.mark.parametrize("values", ["continuous", "few-distinct", "with-inf"])
def test_selection_equals_a_stable_sort_also_with_many_ties(values):
    gen = torch.Generator().manual_seed(2)
    scores = {
        "continuous": torch.rand(16, 48, generator=gen),
        "few-distinct": torch.randint(0, 3, (16, 48), generator=gen).float(),
        "with-inf": torch.where(
            torch.rand(16, 48, generator=gen) < 0.2, float("inf"), torch.randint(0, 4, (16, 48), generator=gen).float()
        ),
    }[values]
    for sparsity in (0.1, 0.5, 0.9):
        per_output = _stable_sort_mask(scores, int(48 * sparsity), 1)
        assert torch.equal(select_mask(scores, sparsity, "per-output"), per_output)
        assert torch.equal(select_mask(scores, sparsity, "per-input"), _stable_sort_mask(scores, int(16 * sparsity), 0))
        flat = _stable_sort_mask(scores.reshape(-1), int(scores.numel() * sparsity), 0).reshape(scores.shape)
        assert torch.equal(select_mask(scores, sparsity, "per-layer"), flat)
    assert torch.equal(select_nm(scores, 2, 4), _stable_sort_mask(scores.reshape(16, 12, 4), 2, 2).reshape(16, 48))


def _random_scores(kind: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    if kind == "rounded":  # heavy ties: a handful of distinct values
        x = (x * 2).round()
    elif kind == "inf":
        x = torch.where(torch.rand(shape, generator=gen) < 0.15, float("inf"), x.round())
        x = torch.where(torch.rand(shape, generator=gen) < 0.15, float("-inf"), x)
    elif kind == "constant":
        x = torch.full(shape, 3.0)
    elif kind == "periodic":  # structured: a strided sample would alias
        x = torch.arange(shape[0] * shape[1], dtype=torch.float).reshape(shape) % 7
    return x


@pytest.fixture
def torch_path(monkeypatch):
    """Selection without the compiled CPU kernels: the path CUDA (and a CPU without numba) takes."""
    switch_kernels(monkeypatch, "0")


@pytest.fixture(params=["default", "torch", "tiny-chunks", "small-blocks"])
def chunking(request, monkeypatch):
    """Run each property four times: as shipped (compiled kernels on the CPU), on the torch path, and on the torch
    path with chunks, samples and batches so small that every path is taken: one slice per chunk (tiny-chunks);
    blocks of several columns, candidates sorted a few at a time across block boundaries, crowded brackets and
    sampled brackets that miss (small-blocks)."""
    import prunekit.selection as groups

    if request.param != "default":
        switch_kernels(monkeypatch, "0")
    if request.param not in ("default", "torch"):
        monkeypatch.setattr(groups, "CHUNK", 7 if request.param == "tiny-chunks" else 200)
        monkeypatch.setattr(groups, "SAMPLE", 5)
        monkeypatch.setattr(groups, "SEARCH_MIN", 2)
        monkeypatch.setattr(groups, "SLICE_SAMPLE", 3)
        monkeypatch.setattr(groups, "BATCH", 3)
        monkeypatch.setattr(groups, "CANDIDATES_MIN", 2)
    return request.param


@pytest.mark.parametrize("kind", ["continuous", "rounded", "inf", "constant", "periodic"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (7, 13), (33, 20), (4, 64), (24, 40)])
def test_fast_selection_equals_a_stable_sort(kind, shape, chunking):
    from prunekit.selection import prune_lowest_flat as _prune_lowest_flat
    from prunekit.selection import prune_lowest_slices as _prune_lowest_slices

    scores = _random_scores(kind, shape, seed=sum(shape))
    rows, cols = shape
    for k in sorted({0, 1, cols // 2, cols - 1, cols}):
        assert torch.equal(_prune_lowest_slices(scores, k, 1), _stable_sort_mask(scores, k, 1)), (k, "rows")
    for k in sorted({0, 1, rows // 2, rows - 1, rows}):
        assert torch.equal(_prune_lowest_slices(scores, k, 0), _stable_sort_mask(scores, k, 0)), (k, "cols")
    flat, n = scores.reshape(-1), scores.numel()
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        assert torch.equal(_prune_lowest_flat(flat, k), _stable_sort_mask(flat, k, 0)), (k, "flat")


@pytest.mark.parametrize("kind", ["continuous", "rounded", "inf", "constant", "periodic"])
@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (5, 16), (2, 6), (7, 32)])
def test_fast_nm_equals_a_stable_sort(kind, n, m, chunking):
    scores = _random_scores(kind, (6, 4 * m), seed=m)
    expected = _stable_sort_mask(scores.reshape(6, 4, m), m - n, 2).reshape(6, 4 * m)
    assert torch.equal(select_nm(scores, n, m), expected)


def test_fast_paths_match_the_old_masks_on_a_large_tie_heavy_layer():
    """Bigger than a chunk and than the sample, so the shipped sizes run their real paths."""
    from prunekit.selection import _prune_lowest

    scores = (torch.randn(700, 3000, generator=torch.Generator().manual_seed(3)) * 4).round().abs()
    scores[5] = 1.0  # one row entirely tied
    for sparsity in (0.5, 0.7):
        k_row, k_col = int(3000 * sparsity), int(700 * sparsity)
        assert torch.equal(select_mask(scores, sparsity, "per-output"), _prune_lowest(scores, k_row, 1))
        assert torch.equal(select_mask(scores, sparsity, "per-input"), _prune_lowest(scores, k_col, 0))
        flat = _prune_lowest(scores.reshape(-1), int(scores.numel() * sparsity), 0).reshape(scores.shape)
        assert torch.equal(select_mask(scores, sparsity, "per-layer"), flat)
    blocks = _prune_lowest(scores.reshape(700, 750, 4), 2, 2).reshape(700, 3000)
    assert torch.equal(select_nm(scores, 2, 4), blocks)


@pytest.mark.parametrize("m", [2, 3, 4, 5, 8, 16])
def test_sorting_networks_sort_every_zero_one_input(m):
    """The 0-1 principle: a comparator network that sorts all 2^m inputs of zeros and ones sorts everything."""
    from prunekit.selection import sorting_network

    bits = ((torch.arange(2**m)[:, None] >> torch.arange(m)) & 1).float()
    v = list(bits.unbind(1))
    for i, j in sorting_network(m):
        v[i], v[j] = torch.minimum(v[i], v[j]), torch.maximum(v[i], v[j])
    assert torch.equal(torch.stack(v, 1), bits.sort(1).values)


@pytest.mark.parametrize("m", [2, 3, 4, 5, 8, 16])
def test_pruned_networks_give_the_two_order_statistics(m):
    """The comparators dropped for N:M leave the k-th and (k+1)-th smallest exact, on every 0-1 input and on
    random scores with ties."""
    from prunekit.selection import _order_stats, _selection_network, sorting_network

    bits = ((torch.arange(2**m)[:, None] >> torch.arange(m)) & 1).float()
    tied = torch.randint(0, 3, (500, m), generator=torch.Generator().manual_seed(m)).float()
    for blocks in (bits, tied):
        ordered = blocks.sort(1).values
        for k in range(1, m):
            kth, after = _order_stats(blocks, k)
            assert torch.equal(kth, ordered[:, k - 1]) and torch.equal(after, ordered[:, k]), k
    assert sum(a + b for _, _, a, b in _selection_network(4, 2)) == 8 < 2 * len(sorting_network(4))


def _old(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    from prunekit.selection import _prune_lowest

    return _prune_lowest(scores, k, dim)


@pytest.mark.parametrize("shape", [(600, 2048), (2048, 600), (96, 4099)])
def test_search_matches_the_old_masks_on_continuous_layers(shape):
    """Shipped sizes, slices long enough for the sampled search, signed scores (the int64 key trick flips
    negative floats), odd lengths (blocks of 1 column), several sparsities."""
    gen = torch.Generator().manual_seed(sum(shape))
    scores = torch.randn(shape, generator=gen) * (torch.rand(shape[1], generator=gen) + 0.1)
    for source in (scores, scores.abs()):
        for sparsity in (0.1, 0.5, 0.9):
            k_row, k_col = int(shape[1] * sparsity), int(shape[0] * sparsity)
            assert torch.equal(select_mask(source, sparsity, "per-output"), _old(source, k_row, 1)), sparsity
            assert torch.equal(select_mask(source, sparsity, "per-input"), _old(source, k_col, 0)), sparsity


@pytest.mark.parametrize("shape", [(0, 1024), (1024, 0), (0, 8)])
def test_empty_layers(shape):
    scores = torch.rand(shape)
    for group in ("per-output", "per-input", "per-layer"):
        assert select_mask(scores, 0.5, group).shape == shape
    assert select_nm(scores, 2, 4).shape == shape if shape[1] % 4 == 0 else True


def test_strided_scores_select_like_contiguous_ones():
    """Transposed or sliced scores (a Conv1D weight, a view): copied chunk by chunk, same masks."""
    gen = torch.Generator().manual_seed(17)
    scores = torch.rand(1100, 1300, generator=gen)
    for view in (scores.T, scores[::2, ::2], scores[:, 7:1207]):
        for group in ("per-output", "per-input", "per-layer"):
            assert torch.equal(select_mask(view, 0.5, group), select_mask(view.contiguous(), 0.5, group)), group
        blocks = view[:, : view.shape[1] // 4 * 4]
        assert torch.equal(select_nm(blocks, 2, 4), select_nm(blocks.contiguous(), 2, 4))
    assert torch.equal(select_mask(scores.T, 0.5, "per-output"), _old(scores.T, 550, 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_select_like_a_stable_sort(dtype):
    """Half precision scores are searched (many ties); float64 ones take ``topk``: both exact."""
    gen = torch.Generator().manual_seed(7)
    scores = (torch.randn(64, 1024, generator=gen).abs() * (torch.rand(1024, generator=gen) + 0.1)).to(dtype)
    for sparsity in (0.3, 0.5):
        k_row, k_col, k_all = int(1024 * sparsity), int(64 * sparsity), int(scores.numel() * sparsity)
        assert torch.equal(select_mask(scores, sparsity, "per-output"), _stable_sort_mask(scores, k_row, 1))
        assert torch.equal(select_mask(scores.T, sparsity, "per-input"), _stable_sort_mask(scores.T, k_row, 0))
        assert torch.equal(select_mask(scores, sparsity, "per-input"), _stable_sort_mask(scores, k_col, 0))
        flat = _stable_sort_mask(scores.reshape(-1), k_all, 0).reshape(scores.shape)
        assert torch.equal(select_mask(scores, sparsity, "per-layer"), flat)


def test_tie_path_runs_only_where_ties_meet_the_threshold(monkeypatch, torch_path):
    """Continuous scores never reach the exact tie path; a row (or column) tied at its threshold alone does."""
    import prunekit.selection as groups

    gen = torch.Generator().manual_seed(11)
    scores = torch.rand(40, 2048, generator=gen)
    tied = scores.clone()
    tied[7, :1024] = 0.5  # row 7: its k-th and (k+1)-th smallest are both 0.5
    tied[7, 1024:] = torch.rand(1024, generator=gen) + 1
    expected = _old(tied, int(2048 * 0.4), 1), _old(tied.T, int(2048 * 0.4), 0)
    calls, original = [], groups._prune_lowest
    monkeypatch.setattr(groups, "_prune_lowest", lambda s, k, d: calls.append(tuple(s.shape)) or original(s, k, d))
    select_mask(scores, 0.5, "per-output"), select_mask(scores.T, 0.5, "per-input")
    assert calls == []
    assert torch.equal(select_mask(tied, 0.4, "per-output"), expected[0])
    assert torch.equal(select_mask(tied.T, 0.4, "per-input"), expected[1])
    assert calls == [(1, 2048), (2048, 1)]


def test_blocks_and_flat_layers_take_their_tie_paths_only_where_ties_are(monkeypatch, torch_path):
    import prunekit.selection as groups

    calls = []
    for name in ("_stable_ranks", "_keep_later_ties"):
        original = getattr(groups, name)
        monkeypatch.setattr(groups, name, lambda *a, f=original, n=name: calls.append(n) or f(*a))
    scores = torch.rand(64, 512, generator=torch.Generator().manual_seed(12))
    select_nm(scores, 2, 4), select_mask(scores, 0.5, "per-layer")
    assert calls == []
    scores[3, :4] = 1.0  # one block tied
    flat = scores.view(-1)
    flat[flat.argmax()] = flat.kthvalue(flat.numel() // 2).values  # the layer's threshold, now twice
    assert torch.equal(select_nm(scores, 2, 4), _old(scores.reshape(64, 128, 4), 2, 2).reshape(64, 512))
    flat = _old(scores.reshape(-1), scores.numel() // 2, 0).reshape(scores.shape)
    assert torch.equal(select_mask(scores, 0.5, "per-layer"), flat)
    assert calls == ["_stable_ranks", "_keep_later_ties"]


def test_search_resolves_nearly_every_slice_itself(monkeypatch, torch_path):
    """The speed claim: on continuous scores the sampled bracket holds the threshold of (nearly) every slice, so
    ``topk`` runs on almost none of them."""
    import prunekit.selection as groups

    fallback = []
    original = groups._kth_topk
    monkeypatch.setattr(groups, "_kth_topk", lambda x, k, d: fallback.append(x.shape[1 - d]) or original(x, k, d))
    gen = torch.Generator().manual_seed(13)
    scores = torch.randn(1000, 4096, generator=gen).abs() * (torch.rand(4096, generator=gen) + 0.1)
    select_mask(scores, 0.5, "per-output"), select_mask(scores[:, :1000].T, 0.5, "per-input")
    assert sum(fallback) <= 20, fallback


@pytest.mark.parametrize("case", ["few-values", "constant", "missed-bracket"])
def test_flat_selection_in_bounded_memory_when_the_bracket_is_crowded_or_missed(case, monkeypatch, torch_path):
    """More than ``CHUNK // 16`` scores in the bracket (or a bracket that misses) find the threshold by counting
    passes instead of gathering; one value in the bracket needs neither."""
    import prunekit.selection as groups

    monkeypatch.setattr(groups, "CHUNK", 4096)
    monkeypatch.setattr(groups, "SAMPLE", 1000)
    gen = torch.Generator().manual_seed(14)
    scores = torch.randint(0, 3, (300, 200), generator=gen).float() - 1
    if case == "constant":
        scores.fill_(2.0)
    if case == "missed-bracket":
        scores = torch.randn(300, 200, generator=gen)
        monkeypatch.setattr(groups, "_bracket_flat", lambda parts, k, dtype: (parts[0].max(), parts[0].max()))
    flat, ordered = scores.reshape(-1), scores.reshape(-1).sort().values
    for k in (1, 12345, flat.numel() // 2, flat.numel() - 1):
        kth, at_most = groups._kth_smallest([flat], k)
        assert kth == ordered[k - 1] and at_most == int((flat <= kth).sum()), k
        assert torch.equal(groups.prune_lowest_flat(flat, k), _stable_sort_mask(flat, k, 0)), k


def test_marked_finds_every_mark():
    from prunekit.selection import _marked

    bits = torch.rand(8 * 1001, generator=torch.Generator().manual_seed(15)) < 0.03
    bits[:3] = True
    bits[-1] = True
    assert torch.equal(_marked(bits), bits.nonzero().squeeze(1))
