"""ADMM weight update and gradual ADMM pruning: optimality against a direct solve, masks, engine use."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import prunekit
from prunekit.graph import weight_matrix
from prunekit.methods import METHODS, UPDATES, Solver, Target
from prunekit.methods.admm import ADMM, admm_gradual, admm_update, cubic_sparsity


def _layer_problem(rows=12, cols=24, n=300, seed=0):
    """A layer whose inputs are correlated and unevenly scaled, so the re-fit matters."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols) + 0.4 * torch.eye(cols)
    x = torch.randn(n, cols, generator=g) @ mix * (0.1 + 3 * torch.rand(cols, generator=g))
    return torch.randn(rows, cols, generator=g), x


def _error(x, weight, new):
    return float(((x.double() @ (weight.double() - new.double()).T) ** 2).sum())


def exact_refit(weight, mask, x, ridge=None):
    """Row by row: least squares on the kept columns, ``min ||X w - X_K v||^2`` (plus ``||D (w_K - v)||^2``
    with ``D^2 = ridge`` when given: the dampened objective), solved directly."""
    x, weight = x.double(), weight.double()
    out = torch.zeros_like(weight)
    for r in range(weight.shape[0]):
        keep = mask[r]
        xk = x[:, keep]
        if ridge is None:
            out[r, keep] = torch.linalg.lstsq(xk, x @ weight[r]).solution
        else:
            a = xk.T @ xk + torch.diag(ridge[keep])
            out[r, keep] = torch.linalg.solve(a, xk.T @ (x @ weight[r]) + ridge[keep] * weight[r, keep])
    return out


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_update_reaches_least_squares_optimum(sparsity):
    """Defaults (20 iterations, rho 1, 1% ridge) land within 1% of the exact re-fit for the mask."""
    weight, x = _layer_problem()
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(3)) >= sparsity
    best = _error(x, weight, exact_refit(weight, mask, x))
    new, _ = UPDATES.create("admm").update(weight, mask, _stats(x), Target(sparsity))
    assert _error(x, weight, new) <= 1.01 * best
    assert _error(x, weight, new) < 0.8 * _error(x, weight, weight * mask)  # the re-fit matters here
    assert _error(x, weight, admm_update(weight, mask, x.T @ x, percdamp=0.0)) <= 1.001 * best


@pytest.mark.parametrize("percdamp", [0.01, 0.1])
def test_update_solves_the_dampened_problem(percdamp):
    """With a ridge (percdamp x mean diag of the normalised X^T X = percdamp x ||X_j||^2 per column; the
    published code uses 0.1) ADMM reaches that problem's exact optimum, solved directly."""
    weight, x = _layer_problem()
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(4)) >= 0.6
    new = admm_update(weight, mask, x.T @ x, percdamp=percdamp)
    ridge = percdamp * (x.T @ x).diagonal().double()
    target = exact_refit(weight, mask, x, ridge)

    def objective(w):
        return _error(x, weight, w) + float((ridge * (weight.double() - w.double()) ** 2).sum())

    assert objective(new) <= 1.01 * objective(target)


def test_update_keeps_the_mask_and_is_exactly_sparse():
    weight, x = _layer_problem()
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(5)) >= 0.5
    new, out_mask = ADMM().update(weight, mask, _stats(x), Target(0.5))
    assert torch.equal(out_mask, mask)
    assert (new[~mask] == 0).all()


def test_scale_of_the_inputs_does_not_matter():
    """Preconditioning by input norms makes rho mean the same for every layer."""
    weight, x = _layer_problem()
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(6)) >= 0.5
    a = admm_update(weight, mask, x.T @ x)
    b = admm_update(weight, mask, (1e3 * x).T @ (1e3 * x))
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_dead_inputs_stay_finite():
    weight, x = _layer_problem()
    x[:, 2] = 0.0
    new, keep = admm_gradual(weight, x.T @ x, Target(0.5, "per-output"))
    assert torch.isfinite(new).all()
    assert not keep[:, 2].any()  # a zero input has Wanda score 0: pruned first


# ------------------------------------------------------------------ gradual pruning


def test_cubic_schedule_rises_fast_then_lands_on_target():
    values = [cubic_sparsity(0.6, t, 15) for t in range(15)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(0.6)
    assert values[0] == pytest.approx(0.6 * (1 - (14 / 15) ** 3))
    assert values[7] > 0.6 * 0.8  # cubic: most of the pruning happens early


@pytest.mark.parametrize("group", ["per-output", "per-layer", "per-input"])
def test_gradual_sparsity_exact_in_its_group(group):
    weight, x = _layer_problem()
    new, keep = admm_gradual(weight, x.T @ x, Target(0.6, group))
    assert torch.equal(new != 0, keep)
    rows, cols = weight.shape
    pruned = (~keep).sum(1) if group == "per-output" else (~keep).sum(0) if group == "per-input" else (~keep).sum()
    expected = {"per-output": int(cols * 0.6), "per-input": int(rows * 0.6), "per-layer": int(rows * cols * 0.6)}
    assert (pruned == expected[group]).all()


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_gradual_nm_valid(nm):
    weight, x = _layer_problem(cols=24)
    new, keep = admm_gradual(weight, x.T @ x, Target(0.0, "per-output", nm))
    assert torch.equal(keep.reshape(12, -1, nm[1]).sum(-1), torch.full((12, 24 // nm[1]), nm[0]))
    assert torch.equal(new != 0, keep)


def test_gradual_beats_one_shot_wanda_mask_without_update():
    weight, x = _layer_problem()
    new, keep = admm_gradual(weight, x.T @ x, Target(0.7, "per-output"))
    wanda_mask = prunekit.groups.select_mask(weight.abs() * x.norm(dim=0), 0.7, "per-output")
    assert _error(x, weight, new) < 0.8 * _error(x, weight, weight * wanda_mask)


def test_gradual_without_steps_is_wanda_mask_plus_update():
    weight, x = _layer_problem()
    new, keep = admm_gradual(weight, x.T @ x, Target(0.6, "per-output"), steps=0)
    wanda_mask = prunekit.groups.select_mask(weight.abs() * x.norm(dim=0), 0.6, "per-output")
    assert torch.equal(keep, wanda_mask)
    torch.testing.assert_close(new, admm_update(weight, wanda_mask, x.T @ x))


def test_parameters_validated():
    with pytest.raises(ValueError, match="steps"):
        METHODS.create("admm-gradual", {"steps": 30, "iterations": 20})
    with pytest.raises(ValueError, match="rho"):
        UPDATES.create("admm", {"rho": 0.0})
    with pytest.raises(ValueError, match="no parameter"):
        UPDATES.create("admm", {"iters": 5})


# ------------------------------------------------------------------ through the engine


def _stats(x):
    from prunekit.collect import LayerStats

    return LayerStats(
        sq_sum=x.square().sum(0, keepdim=True), xtx=(x.T @ x).unsqueeze(0), nsamples=x.shape[0], ntokens=x.shape[0]
    )


def _block0_masks(model):
    return {n: (m.weight != 0) for n, m in model.model.layers[0].named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("criterion", ["wanda", "magnitude"])
def test_criterion_times_admm_keeps_the_criterion_mask(criterion, token_batch):
    from tests.conftest import tiny_llama

    plain, updated = tiny_llama(), tiny_llama()
    prunekit.prune(plain, criterion, 0.75, calib=token_batch)
    report = prunekit.prune(
        updated, criterion, 0.75, calib=token_batch, update="admm", update_params={"iterations": 10}
    )
    assert report.sparsity == pytest.approx(0.75)
    for name, mask in _block0_masks(plain).items():  # block 0 sees the same inputs in both runs
        assert torch.equal(_block0_masks(updated)[name], mask)
    w_plain = plain.model.layers[0].mlp.up_proj.weight
    w_new = updated.model.layers[0].mlp.up_proj.weight
    assert not torch.allclose(w_plain, w_new)  # the kept weights were re-fitted


def test_gradual_through_prune_nm(llama, token_batch):
    prunekit.prune(llama, "admm-gradual", 0.5, "2:4", calib=token_batch)
    w = llama.model.layers[1].self_attn.o_proj.weight.detach()
    assert torch.equal((w.reshape(w.shape[0], -1, 4) != 0).sum(-1), torch.full((w.shape[0], w.shape[1] // 4), 2))


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 6, 1)
    ).eval()


@pytest.mark.parametrize(
    "method,update,group",
    [
        ("admm-gradual", None, "per-output"),
        ("admm-gradual", None, "per-layer"),
        ("magnitude", "admm", "per-layer"),
        ("wanda", "admm", "per-output"),
    ],
)
def test_conv_layers_with_groups_through_prune(method, update, group):
    model = _conv_net()
    images = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    report = prunekit.prune(model, method, 0.5, group=group, calib=images, include=["*"], update=update)
    assert set(report.layers) == {"0", "2", "4"}
    grouped = weight_matrix(model[2]).detach()  # [8, 36], two groups of 4 rows
    assert torch.isfinite(grouped).all()
    if group == "per-output":
        assert ((grouped == 0).sum(1) == 18).all()
    elif method == "admm-gradual":  # a solver sees each conv group as its own layer
        assert [int((chunk == 0).sum()) for chunk in grouped.split(4)] == [72, 72]
    else:  # a criterion's per-layer group spans the whole layer
        assert int((grouped == 0).sum()) == 8 * 36 // 2


def test_registered_with_defaults():
    grad = METHODS.create("admm-gradual")
    assert isinstance(grad, Solver) and (grad.rho, grad.iterations, grad.steps, grad.percdamp) == (1.0, 20, 15, 0.01)
    update = UPDATES.create("admm")
    assert (update.rho, update.iterations, update.percdamp) == (1.0, 20, 0.01)


# ------------------------------------------------------------------ on the trained fixture


@pytest.mark.slow
def test_layer_error_ordering_on_fixture(kjv_train_tokens):
    """One real layer (block 0's down_proj of kjv-llama-5m, dense inputs) at 70%: the weight-update
    methods reconstruct its output better than Wanda's mask alone, and ADMM-gradual beats SparseGPT."""
    from prunekit.collect import collect
    from prunekit.data import random_windows
    from tests.conftest import load_kjv_llama

    model, tokens = load_kjv_llama(), kjv_train_tokens
    layer = model.model.layers[0].mlp.down_proj
    with torch.no_grad(), collect({"down": layer}, hessian=True) as stats:
        model(random_windows(tokens, 16, 256, seed=0), use_cache=False)
    stats = stats["down"]
    weight, hessian = layer.weight.detach().float(), stats.hessian()[0]

    def error(w):
        return float(torch.einsum("ij,jk,ik->", weight - w, hessian, weight - w))

    target = Target(0.7, "per-output")
    wanda_mask = prunekit.groups.select_mask(METHODS.create("wanda").score(weight, stats), 0.7, "per-output")
    errors = {
        "wanda": error(weight * wanda_mask),
        "sparsegpt": error(METHODS.create("sparsegpt").prune(weight, stats, Target(0.7, "per-layer"))[0]),
        "wanda+admm": error(UPDATES.create("admm").update(weight, wanda_mask, stats, target)[0]),
        "admm-gradual": error(METHODS.create("admm-gradual").prune(weight, stats, target)[0]),
    }
    assert errors["admm-gradual"] < errors["sparsegpt"] < errors["wanda"], errors
    assert errors["wanda+admm"] < 0.5 * errors["wanda"], errors
