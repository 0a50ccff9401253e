"""Every registered method and update goes through the same contract, so a new one is tested on arrival."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import prunekit
from prunekit.methods import METHODS, UPDATES, Method, register_method
from tests.conftest import tiny_llama

CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def _check_nm(model, n=2, m=4):
    for layer in prunekit.select_layers(model).values():
        w = layer.weight.reshape(layer.weight.shape[0], -1, m)
        assert ((w != 0).sum(-1) <= n).all()


@pytest.mark.parametrize("name", METHODS.names())
def test_method_unstructured_and_nm_on_llama(name):
    model = tiny_llama()
    report = prunekit.prune(model, name, 0.5, calib=CALIB)
    assert report.sparsity == pytest.approx(0.5, abs=0.02)
    assert torch.isfinite(model(CALIB).logits).all()
    model = tiny_llama()
    prunekit.prune(model, name, pattern="2:4", calib=CALIB)
    _check_nm(model)


@pytest.mark.parametrize("name", METHODS.names())
def test_method_on_grouped_conv(name):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 1),
        nn.Flatten(),
        nn.Linear(16 * 36, 4),
    )
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    report = prunekit.prune(model, name, 0.5, calib=batches, layer_types=["all"])
    assert set(report.layers) == {"2", "4"}
    assert report.sparsity == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("name", UPDATES.names())
def test_update_after_wanda_keeps_sparsity(name):
    model = tiny_llama()
    report = prunekit.prune(model, "wanda", 0.6, calib=CALIB, update=name)
    assert report.sparsity == pytest.approx(0.6, abs=0.02)
    assert torch.isfinite(model(CALIB).logits).all()


def test_registering_twice_is_an_error():
    with pytest.raises(ValueError, match="registered twice"):

        @register_method
        @dataclass
        class Again(Method):
            name = "wanda"
