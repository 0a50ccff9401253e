"""Magnitude (prunekit/methods/magnitude.py): no calibration data, compared per layer by default."""

import prunekit
from tests.conftest import tiny_llama


def test_magnitude_needs_no_data_and_is_per_layer():
    model = tiny_llama()
    report = prunekit.prune(model, "magnitude", 0.5)
    assert report.settings["group"] == "per-layer"
    w = model.model.layers[0].mlp.up_proj.weight
    assert (w == 0).sum() == w.numel() // 2
