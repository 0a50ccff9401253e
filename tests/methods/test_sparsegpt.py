"""SparseGPT against a plain, unblocked OBS loop; Hessian counting against the published add_batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.collect import collect
from prunekit.errors import PrunekitError
from prunekit.graph import weight_matrix
from prunekit.methods import METHODS, Solver, Target
from prunekit.methods.sparsegpt import SparseGPT, sparsegpt

# ------------------------------------------------------------------ plain reference (float64, no tricks)


def _lowest(scores: list[float], k: int) -> list[int]:
    """Indices of the k lowest scores, lower index first on ties."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))[:k]


def reference_sparsegpt(weight, hessian, sparsity, blocksize, percdamp, nm=None):
    """The published algorithm written as the plain OBS loop: for every column j, the inverse Hessian of
    the columns not yet visited is inv(H[j:, j:]); prune, then push the error onto columns j.. ."""
    w = weight.double().clone()
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    for i in torch.nonzero(dead).flatten().tolist():
        h[i, i] = 1.0
    w[:, dead] = 0.0
    h = h + percdamp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    rows, cols = w.shape
    hinv_diag = [torch.linalg.inv(h[k:, k:])[0, 0].item() for k in range(cols)]
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    for j in range(cols):
        if nm is None and j % blocksize == 0:
            block = list(range(j, min(j + blocksize, cols)))
            scores = [w[r, c].item() ** 2 / hinv_diag[c] for r in range(rows) for c in block]
            for flat in _lowest(scores, int(len(scores) * sparsity)):
                pruned[flat // len(block), block[flat % len(block)]] = True
        if nm is not None and j % nm[1] == 0:
            for r in range(rows):
                scores = [w[r, c].item() ** 2 / hinv_diag[c] for c in range(j, j + nm[1])]
                for c in _lowest(scores, nm[1] - nm[0]):
                    pruned[r, j + c] = True
        hinv = torch.linalg.inv(h[j:, j:])
        err = torch.where(pruned[:, j], w[:, j], torch.zeros_like(w[:, j])) / hinv[0, 0]
        w[:, j:] -= torch.outer(err, hinv[0, :])
    w[pruned] = 0.0
    return w, ~pruned


def _layer_problem(rows=6, cols=16, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols) + 0.5 * torch.eye(cols)
    x = torch.randn(n, cols, generator=g) @ mix
    weight = torch.randn(rows, cols, generator=g)
    return weight, 2 * x.T @ x / n, x


@pytest.mark.parametrize("blocksize", [16, 8])
def test_matches_plain_obs_unstructured(blocksize):
    weight, hessian, _ = _layer_problem()
    new, keep = sparsegpt(weight, hessian, Target(0.5, "per-layer"), blocksize=blocksize, percdamp=0.01)
    ref_w, ref_keep = reference_sparsegpt(weight, hessian, 0.5, blocksize, 0.01)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new.double(), ref_w, atol=1e-4, rtol=1e-4)


def test_matches_plain_obs_nm():
    weight, hessian, _ = _layer_problem(cols=16)
    new, keep = sparsegpt(weight, hessian, Target(0.5, "per-layer", (2, 4)), blocksize=8, percdamp=0.01)
    ref_w, ref_keep = reference_sparsegpt(weight, hessian, 0.5, 8, 0.01, nm=(2, 4))
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new.double(), ref_w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_nm_keeps_exactly_n_of_every_m(nm):
    weight, hessian, _ = _layer_problem(rows=8, cols=32)
    new, keep = sparsegpt(weight, hessian, Target(0.0, "per-layer", nm))
    assert torch.equal(keep.reshape(8, -1, nm[1]).sum(-1), torch.full((8, 32 // nm[1]), nm[0]))
    assert torch.equal(new != 0, keep)


def test_blocks_prune_exactly_their_share():
    weight, hessian, _ = _layer_problem(rows=5, cols=24)
    _, keep = sparsegpt(weight, hessian, Target(0.6, "per-layer"), blocksize=10)
    pruned_per_block = [int((~keep[:, a : a + 10]).sum()) for a in (0, 10, 20)]
    assert pruned_per_block == [int(50 * 0.6), int(50 * 0.6), int(20 * 0.6)]


def test_per_output_group_prunes_each_row_within_each_block():
    weight, hessian, _ = _layer_problem(rows=5, cols=24)
    _, keep = sparsegpt(weight, hessian, Target(0.5, "per-output"), blocksize=12)
    assert torch.equal((~keep[:, :12]).sum(1), torch.full((5,), 6))
    assert torch.equal((~keep[:, 12:]).sum(1), torch.full((5,), 6))


def test_reconstruction_beats_masking_alone():
    weight, hessian, x = _layer_problem(rows=8, cols=32, n=400)
    new, keep = sparsegpt(weight, hessian, Target(0.7, "per-layer"))
    err_update = ((x @ (weight - new).T) ** 2).sum()
    err_mask = ((x @ (weight - weight * keep).T) ** 2).sum()
    assert err_update < 0.9 * err_mask


def test_dead_inputs_are_zeroed():
    weight, _, x = _layer_problem(cols=16)
    x[:, 3] = 0.0
    new, keep = sparsegpt(weight, 2 * x.T @ x / x.shape[0], Target(0.25, "per-layer"))
    assert not keep[:, 3].any() and (new[:, 3] == 0).all()
    assert torch.isfinite(new).all()


def test_blocksize_must_fit_nm_groups():
    weight, hessian, _ = _layer_problem(cols=16)
    with pytest.raises(ValueError, match="multiple of M=4"):
        sparsegpt(weight, hessian, Target(0.5, "per-layer", (2, 4)), blocksize=6)


def test_bad_parameters_fail_early():
    with pytest.raises(ValueError, match="blocksize"):
        METHODS.create("sparsegpt", {"blocksize": 0})
    with pytest.raises(ValueError, match="no parameter"):
        METHODS.create("sparsegpt", {"block_size": 64})


def test_singular_hessian_without_damping_names_the_fix():
    hessian = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # indefinite: not a Gram matrix of real inputs
    with pytest.raises(PrunekitError, match="percdamp"):
        sparsegpt(torch.randn(3, 2), hessian, Target(0.5, "per-layer"), percdamp=0.0)


# ------------------------------------------------------------------ through the engine


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 6, 1)
    ).eval()


def test_conv_layers_with_groups_through_prune():
    model = _conv_net()
    images = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    report = prunekit.prune(model, "sparsegpt", 0.5, group="per-layer", calib=images, include=["*"])
    assert set(report.layers) == {"0", "2", "4"}
    grouped = weight_matrix(model[2]).detach()  # [8, 36]: two groups of 4 rows, each one block of 36 cols
    for chunk in grouped.split(4):
        assert int((chunk == 0).sum()) == int(chunk.numel() * 0.5)
    assert int((weight_matrix(model[0]) == 0).sum()) == int(8 * 36 * 0.5)


def test_linear_model_through_prune_nm(llama, token_batch):
    prunekit.prune(llama, "sparsegpt", 0.5, "2:4", calib=token_batch)
    w = llama.model.layers[0].mlp.down_proj.weight.detach()
    assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


def test_registered_with_defaults():
    method = METHODS.create("sparsegpt")
    assert isinstance(method, SparseGPT) and isinstance(method, Solver)
    assert (method.blocksize, method.percdamp, method.default_group) == (128, 0.01, "per-layer")


# ------------------------------------------------------------------ Hessian counting (collect.py)


def published_hessian(batches: list[torch.Tensor], unfold: nn.Unfold | None = None) -> torch.Tensor:
    """IST-DASLab/sparsegpt ``add_batch`` written out: a running average where each call counts its batch
    items (``tmp = inp.shape[0]``, 1 for a 2-D input) and adds ``(sqrt(2/n) X)^T (sqrt(2/n) X)``.
    Convolutions are unfolded to im2col columns as the GPTQ/SparseGPT code does for ``nn.Conv2d``."""
    h, nsamples = None, 0
    for inp in batches:
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if unfold is None:
            inp = inp.reshape(-1, inp.shape[-1]).t()
        else:
            inp = unfold(inp).permute(1, 0, 2).flatten(1)
        h = torch.zeros(inp.shape[0], inp.shape[0], dtype=torch.float64) if h is None else h
        h *= nsamples / (nsamples + tmp)
        nsamples += tmp
        inp = math.sqrt(2 / nsamples) * inp.double()
        h += inp @ inp.t()
    return h


def _collected_hessian(layer: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    with collect({"layer": layer}, hessian=True) as stats:
        for b in batches:
            layer(b)
    return stats["layer"].hessian()[0].double()


def test_hessian_counts_batch_items_like_published_linear():
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(6, 3)
    batches = [torch.randn(3, 5, 6, generator=g), torch.randn(1, 5, 6, generator=g), torch.randn(4, 6, generator=g)]
    torch.testing.assert_close(_collected_hessian(layer, batches), published_hessian(batches), rtol=1e-5, atol=1e-6)


def test_hessian_counts_batch_items_like_published_conv():
    g = torch.Generator().manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    batches = [torch.randn(2, 3, 7, 7, generator=g), torch.randn(5, 3, 7, 7, generator=g)]
    unfold = nn.Unfold(3, dilation=1, padding=1, stride=2)
    torch.testing.assert_close(
        _collected_hessian(layer, batches), published_hessian(batches, unfold), rtol=1e-5, atol=1e-6
    )


def test_hessian_counts_unbatched_conv_input_as_one_item():
    """An unbatched conv input [C, H, W] is one sample (an earlier collect.py counted C)."""
    g = torch.Generator().manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, padding=1)
    batches = [torch.randn(3, 5, 5, generator=g), torch.randn(3, 5, 5, generator=g)]
    batched = [b.unsqueeze(0) for b in batches]  # the same data, as 1-item batches
    torch.testing.assert_close(_collected_hessian(layer, batches), _collected_hessian(layer, batched))


def test_conv_hessian_columns_match_unfold_order():
    """The engine's im2col column order is the weight's ``[out, in * kh * kw]`` order (F.unfold's)."""
    g = torch.Generator().manual_seed(1)
    layer = nn.Conv2d(2, 3, (2, 3))
    x = torch.randn(2, 2, 4, 5, generator=g)
    cols = F.unfold(x, (2, 3)).permute(0, 2, 1).reshape(-1, 12)
    torch.testing.assert_close(_collected_hessian(layer, [x]), (2 * cols.T @ cols / 2).double(), rtol=1e-5, atol=1e-6)
