"""The shared helpers the structural methods lean on: meta rehearsal copies, the reload check, Conv1D slicing."""

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.structured.common import meta_clone, slice_linear
from prunekit.structured.reload import differences, ensure_reloadable, rebuilt
from tests import zoo


def test_meta_clone_copies_structure_and_ties_but_no_data():
    model = zoo.build("gemma")  # tied head
    clone = meta_clone(model)
    assert all(p.is_meta for p in clone.parameters()) and not any(p.is_meta for p in model.parameters())
    assert clone.lm_head.weight is clone.model.embed_tokens.weight
    assert clone.config is not model.config and clone.config.to_dict() == model.config.to_dict()


def test_a_model_matches_what_its_config_rebuilds_until_a_shape_changes():
    model = meta_clone(zoo.build("llama"))
    assert differences(model, rebuilt(model)) == []
    slice_linear(model.model.layers[1].mlp.up_proj, torch.arange(60), 0)
    assert differences(model, rebuilt(model)) == [
        "model.layers.1.mlp.up_proj.out_features: 60 != 64",
        "model.layers.1.mlp.up_proj.weight: (60, 32) != (64, 32)",
    ]
    with pytest.raises(PrunekitError, match="^llama: width would leave a model its config cannot describe"):
        ensure_reloadable(model, "width")


@pytest.mark.parametrize("dim", [0, 1])
def test_slicing_a_conv1d_is_slicing_its_linear_view(dim):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 4)  # 4 in, 6 out, weight stored [in, out]
    linear = nn.Linear(4, 6)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    keep = torch.tensor([0, 2, 3])
    slice_linear(conv, keep, dim)
    slice_linear(linear, keep, dim)
    x = torch.randn(5, linear.in_features)
    torch.testing.assert_close(conv(x), linear(x))
