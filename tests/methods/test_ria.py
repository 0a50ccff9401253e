import pytest
import torch

import prunekit
from prunekit.collect import LayerStats
from prunekit.engine import prune_matrix
from prunekit.methods import METHODS, Target
from prunekit.methods.ria import relative_importance
from tests.conftest import tiny_llama


def _stats(sq_sum):
    return LayerStats(sq_sum=torch.as_tensor(sq_sum, dtype=torch.float32)[None])


def test_ria_score_is_the_published_formula_elementwise():
    w = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, 0.5]])
    sq = torch.tensor([4.0, 9.0, 16.0])  # column norms 2, 3, 4
    scores = METHODS.create("ria").score(w, _stats(sq))
    for i in range(2):
        for j in range(3):
            col = sum(abs(w[k, j].item()) for k in range(2))
            row = sum(abs(w[i, k].item()) for k in range(3))
            ri = abs(w[i, j].item()) / col + abs(w[i, j].item()) / row
            assert scores[i, j].item() == pytest.approx(ri * (sq[j].item() ** 0.5) ** 0.5, rel=1e-6)


def test_ria_exponent_zero_is_relative_importance_and_zero_rows_are_finite():
    w = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    scores = METHODS.create("ria", {"a": 0.0}).score(w, _stats([1.0, 100.0]))
    assert torch.equal(scores, relative_importance(w))
    assert torch.isfinite(scores).all() and scores[0].abs().sum() == 0
    assert scores[1].tolist() == pytest.approx([1 / 1 + 1 / 4, 3 / 3 + 3 / 4])


def test_ria_defaults_to_per_layer_like_the_published_code():
    assert METHODS["ria"].default_group == "per-layer"


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_ria_nm_masks_keep_exactly_n_of_every_m(nm):
    torch.manual_seed(0)
    w, sq = torch.randn(12, 32), torch.rand(32) * 10
    new, mask = prune_matrix(w, _stats(sq), 1, METHODS.create("ria"), [], Target(1 - nm[0] / nm[1], nm=nm))
    assert (mask.reshape(12, -1, nm[1]).sum(-1) == nm[0]).all()
    assert torch.equal(new == 0, ~mask)


def test_ria_prunes_a_tiny_llama_to_2_4():
    model = tiny_llama()
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    report = prunekit.prune(model, "ria", 0.5, pattern="2:4", calib=calib)
    assert report.sparsity == pytest.approx(0.5)
    w = model.model.layers[0].mlp.down_proj.weight
    assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()
