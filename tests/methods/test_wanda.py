"""Wanda (prunekit/methods/wanda.py): the score formula, and whole-model pruning equal to the published
algorithm (tests/reference.py)."""

import copy

import pytest
import torch

import prunekit
from prunekit.methods import METHODS
from tests.conftest import tiny_llama
from tests.reference import reference_wanda


def test_wanda_score_is_the_formula():
    from prunekit.collect import LayerStats

    w = torch.randn(3, 4)
    stats = LayerStats(sq_sum=torch.tensor([[1.0, 4.0, 9.0, 16.0]]))
    score = METHODS.create("wanda").score(w, stats)
    torch.testing.assert_close(score, w.abs() * torch.tensor([1.0, 2.0, 3.0, 4.0]))


@pytest.mark.parametrize("setting", [dict(sparsity=0.5), dict(sparsity=0.7), dict(pattern="2:4")])
def test_wanda_equals_published_algorithm(setting):
    model = tiny_llama(layers=3, hidden=64, intermediate=128)
    ref = copy.deepcopy(model)
    calib = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        if "pattern" in setting:
            reference_wanda(ref, calib, 0.5, prune_n=2, prune_m=4)  # Wanda's prune_n counts pruned weights
        else:
            reference_wanda(ref, calib, setting["sparsity"])
    prunekit.prune(model, "wanda", calib=calib, batch_size=1, **setting)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p == 0, q == 0), name
        torch.testing.assert_close(p, q)
