"""torchvision and timm CNNs end to end on tiny random instances (no weights downloaded): the walker finds
their layers, the defaults keep stem and classifier dense, and magnitude / Wanda prune every conv and
Linear to the exact per-layer count with the model still producing finite logits."""

from __future__ import annotations

import copy

import pytest
import torch

import prunekit
from prunekit.bn import batchnorm_layers
from prunekit.graph import CONV_TYPES, find_layers, layer_type, select_layers

TINY = dict(num_classes=10)
SMALL_DIMS = dict(dims=(16, 32, 48, 64))


def _torchvision(name: str):
    import torchvision

    return lambda: torchvision.models.get_model(name, weights=None, **TINY)


def _timm(name: str, **kwargs):
    import timm

    return lambda: timm.create_model(name, pretrained=False, **TINY, **kwargs)


MODELS = {
    "torchvision-resnet18": (_torchvision("resnet18"), "conv1", "fc"),
    "torchvision-mobilenet_v3_small": (_torchvision("mobilenet_v3_small"), "features.0.0", "classifier.3"),
    "torchvision-efficientnet_b0": (_torchvision("efficientnet_b0"), "features.0.0", "classifier.1"),
    "torchvision-regnet_y_400mf": (_torchvision("regnet_y_400mf"), "stem.0", "fc"),
    "timm-resnet18": (_timm("resnet18", channels=(16, 32, 64, 128), stem_width=16), "conv1", "fc"),
    "timm-convnext_atto-conv_mlp": (_timm("convnext_atto", **SMALL_DIMS), "stem.0", "head.fc"),
    "timm-convnext_tiny-linear_mlp": (_timm("convnext_tiny", depths=(1, 1, 2, 1), **SMALL_DIMS), "stem.0", "head.fc"),
    "timm-efficientnet_b0": (_timm("efficientnet_b0"), "conv_stem", "classifier"),
    "timm-mobilenetv3_small_100": (_timm("mobilenetv3_small_100"), "conv_stem", "classifier"),
}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _check_walk(model: torch.nn.Module, stem: str, head: str) -> dict[str, torch.nn.Module]:
    layers = find_layers(model)
    assert stem in layers and head in layers
    assert any(isinstance(m, CONV_TYPES) for m in layers.values())
    default = select_layers(model)
    assert stem not in default and head not in default
    assert all(layer_type(m) == "linear" for m in default.values())
    everything = select_layers(model, layer_types=("all",))
    assert set(everything) == set(layers) - {stem, head}
    return everything


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cnn_walk_and_prune(name, images):
    build, stem, head = MODELS[name]
    torch.manual_seed(0)
    dense = build().eval()
    selected = _check_walk(dense, stem, head)
    assert all((m.weight != 0).all() for m in selected.values()), "a dense weight is already zero"
    for method in ("magnitude", "wanda"):
        model = copy.deepcopy(dense)
        report = prunekit.prune(model, method, 0.5, group="per-layer", calib=[images], layer_types=("all",))
        assert set(report.layers) == set(selected)
        assert {n: r["zeros"] for n, r in report.layers.items()} == {
            n: int(r["numel"] * 0.5) for n, r in report.layers.items()
        }
        # BatchNorm statistics are recalibrated by default when calibration data is given (ConvNeXt has none)
        assert (report.bn_recalibration is not None) == bool(batchnorm_layers(model))
        assert all(torch.isfinite(bn.running_var).all() for bn in batchnorm_layers(model).values())
        with torch.no_grad():
            logits = model(images)
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()
