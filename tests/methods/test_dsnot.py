import pytest
import torch
from torch import nn

import prunekit
from prunekit.collect import LayerStats, collect, conv_columns
from prunekit.engine import prune_matrix
from prunekit.methods import METHODS, UPDATES, Target
from tests.conftest import tiny_llama

# ---------------------------------------------------------------- the collector's column sums


def test_collect_accumulates_column_sums_of_linear_inputs():
    layer = nn.Linear(6, 3)
    xs = [torch.randn(2, 5, 6), torch.randn(4, 6)]
    with collect({"l": layer}) as stats:
        for x in xs:
            layer(x)
    expected = sum(x.reshape(-1, 6).sum(0) for x in xs)
    assert torch.allclose(stats["l"].col_sum[0], expected, atol=1e-5)
    assert stats["l"].ntokens == 14


@pytest.mark.parametrize("hessian", [False, True])
def test_collect_accumulates_im2col_column_sums_of_grouped_convs(hessian):
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=2)
    x = torch.randn(3, 4, 7, 7)
    with collect({"c": conv}, hessian=hessian) as stats:
        conv(x)
    assert torch.allclose(stats["c"].col_sum, conv_columns(x, conv).sum(dim=1), atol=1e-4)
    assert torch.allclose(stats["c"].group(1).col_sum, stats["c"].col_sum[1:2])


# ---------------------------------------------------------------- DSnoT


def _layer_stats(x: torch.Tensor, cols: int) -> LayerStats:
    layer = nn.Linear(cols, 1, bias=False)
    with collect({"l": layer}) as stats:
        layer(x)
    return stats["l"]


def _mean_output_error(w, mask, x):
    """Per row, |mean over tokens of (W - W*mask) x|: the error DSnoT minimises, from the inputs themselves."""
    return ((w * ~mask) @ x.reshape(-1, x.shape[-1]).T).mean(dim=1).abs()


def _inputs(cols, seed=0):
    gen = torch.Generator().manual_seed(seed)
    offset = torch.randn(cols, generator=gen) * 2  # non-zero column means, or there is nothing to fix
    return torch.randn(4, 32, cols, generator=gen) * (0.5 + torch.rand(cols, generator=gen)) + offset


def test_dsnot_hand_checked_swap():
    # m = col_sum / nsamples = 1 for every column; kept {1, 3}, error = 0.5 + 0.3 = 0.8 > 0:
    # regrow col 0 (largest W m / var), prune col 1 (kept, W m < 0) -> error 0.2; nothing negative is left
    w = torch.tensor([[0.5, -0.1, 0.3, 2.0]])
    stats = LayerStats(sq_sum=torch.full((1, 4), 2.0), col_sum=torch.ones(1, 4), nsamples=1, ntokens=2)
    mask = torch.tensor([[False, True, False, True]])
    _, new = UPDATES.create("dsnot", {"threshold": 0.0}).update(w, mask, stats, Target(0.5))
    assert new.tolist() == [[True, False, False, True]]
    assert torch.equal(mask, torch.tensor([[False, True, False, True]]))  # the input mask is not modified


@pytest.mark.parametrize("group", ["per-output", "per-layer"])
@pytest.mark.parametrize("same_sign", [True, False])
def test_dsnot_never_increases_the_expected_error_and_keeps_row_counts(group, same_sign):
    torch.manual_seed(0)
    w, x = torch.randn(32, 64), _inputs(64)
    stats = _layer_stats(x, 64)
    target = Target(0.6, group)
    _, mask = prune_matrix(w, stats, 1, METHODS.create("wanda"), [], target)
    _, new = UPDATES.create("dsnot", {"threshold": 0.0, "same_sign": same_sign}).update(w, mask, stats, target)
    before, after = _mean_output_error(w, mask, x), _mean_output_error(w, new, x)
    assert (after <= before + 1e-4).all()
    assert after.sum() < 0.8 * before.sum()  # it did swap
    assert torch.equal(new.sum(dim=1), mask.sum(dim=1))


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_dsnot_nm_stays_valid_and_never_increases_the_error(nm):
    torch.manual_seed(1)
    w, x = torch.randn(24, 64), _inputs(64, seed=1)
    stats = _layer_stats(x, 64)
    target = Target(0.5, nm=nm)
    new_w, mask = prune_matrix(
        w, stats, 1, METHODS.create("wanda"), [UPDATES.create("dsnot", {"threshold": 0.0})], target
    )
    _, wanda_mask = prune_matrix(w, stats, 1, METHODS.create("wanda"), [], target)
    assert (mask.reshape(24, -1, nm[1]).sum(-1) == nm[0]).all()
    assert torch.equal(new_w == 0, ~mask)
    before, after = _mean_output_error(w, wanda_mask, x), _mean_output_error(w, mask, x)
    assert (after <= before + 1e-4).all() and not torch.equal(mask, wanda_mask)


def test_dsnot_threshold_and_cycles_limit_the_swaps():
    w, x = torch.randn(16, 32, generator=torch.Generator().manual_seed(2)), _inputs(32, seed=2)
    stats = _layer_stats(x, 32)
    _, mask = prune_matrix(w, stats, 1, METHODS.create("wanda"), [], Target(0.5))
    _, same = UPDATES.create("dsnot", {"threshold": 1e9}).update(w, mask, stats, Target(0.5))
    _, one = UPDATES.create("dsnot", {"threshold": 0.0, "max_cycles": 1}).update(w, mask, stats, Target(0.5))
    assert torch.equal(same, mask)
    assert ((one != mask).sum(dim=1) <= 2).all() and (one != mask).any()


def test_dsnot_without_column_sums_says_what_is_missing():
    stats = LayerStats(sq_sum=torch.ones(1, 4))
    with pytest.raises(ValueError, match="col_sum"):
        UPDATES.create("dsnot").update(torch.ones(2, 4), torch.ones(2, 4, dtype=torch.bool), stats, Target(0.5))


def test_wanda_plus_dsnot_prunes_a_tiny_llama_at_the_target():
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    plain, refined = tiny_llama(), tiny_llama()
    prunekit.prune(plain, "wanda", 0.5, calib=calib)
    report = prunekit.prune(refined, "wanda", 0.5, calib=calib, update="dsnot", update_params={"threshold": 0.0})
    assert report.sparsity == pytest.approx(0.5)
    assert all(row["sparsity"] == pytest.approx(0.5) for row in report.layers.values())
    differs = [
        not torch.equal(a.weight == 0, b.weight == 0)
        for a, b in zip(plain.model.layers.modules(), refined.model.layers.modules())
        if isinstance(a, nn.Linear)
    ]
    assert any(differs)


def test_dsnot_on_grouped_convs_keeps_each_row_count():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 36, 4),
    )
    batches = [torch.randn(4, 3, 8, 8) + 1 for _ in range(2)]
    report = prunekit.prune(
        model,
        "wanda",
        0.5,
        calib=batches,
        layer_types=["all"],
        group="per-output",
        update="dsnot",
        update_params={"threshold": 0.0},
    )
    assert set(report.layers) == {"2"}
    assert ((model[2].weight != 0).reshape(8, -1).sum(dim=1) == 18).all()  # 36 columns per row, half kept
