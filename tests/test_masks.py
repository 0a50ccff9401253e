"""Keep masks and the one bit packing (shared by the compact format and the Lightning callback's state)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from prunekit.masks import (
    apply_masks,
    count_zeros,
    mask_gradients,
    masks_from_weights,
    pack_mask,
    packbits,
    unpack_mask,
    unpackbits,
)


@pytest.mark.parametrize("count", [1, 7, 8, 83])
def test_packbits_is_numpys_bit_order_and_inverts(count):
    bits = torch.rand(count, generator=torch.Generator().manual_seed(count)) > 0.5
    packed = packbits(bits)
    assert packed.tolist() == np.packbits(bits.numpy()).tolist()
    assert torch.equal(unpackbits(packed, count), bits)


def test_callback_state_and_compact_format_share_the_packing():
    """Defect 13: the callback packed LSB-first, the compact format MSB-first; one packing now."""
    from prunekit.io import compact

    mask = torch.rand(5, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    packed = pack_mask(mask)
    assert torch.equal(packed["bits"], compact.packbits(mask)) and packed["shape"] == [5, 9]
    assert torch.equal(unpack_mask(packed), mask)


def test_masks_apply_to_weights_and_gradients():
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight[0] = 0
    masks = masks_from_weights({"fc": layer})
    layer.weight.grad = torch.ones_like(layer.weight)
    mask_gradients({"fc": layer}, masks)
    assert (layer.weight.grad[0] == 0).all() and (layer.weight.grad[1:] == 1).all()
    with torch.no_grad():
        layer.weight.add_(1)
    apply_masks({"fc": layer}, masks)
    assert (layer.weight[0] == 0).all()


def test_count_zeros_counts_negative_zero_across_chunks():
    weight = torch.randn(7, 13)
    weight[0, :5] = 0.0
    weight[3, 2] = -0.0
    weight[6, 12] = 0.0
    expected = int((weight == 0).sum())
    assert expected == 7
    assert count_zeros(weight, chunk=4) == count_zeros(weight) == expected


def test_gradients_of_pruned_fused_expert_weights_are_masked():
    """Issue 28 item 3: ``mask_gradients`` read ``.weight.grad`` of each expert view, which a slice of a fused
    parameter does not have, so fine-tuning a pruned MoE model revived pruned expert weights."""
    import prunekit
    from prunekit.graph import select_layers
    from prunekit.masks import mask_gradients, masks_from_weights
    from prunekit.moe import ExpertWeight
    from tests import zoo

    model = zoo.build("mixtral")
    prunekit.prune(model, "magnitude", 0.5)
    layers = select_layers(model)
    views = {n: m for n, m in layers.items() if isinstance(m, ExpertWeight)}
    assert views
    masks = masks_from_weights(layers)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    mask_gradients(layers, masks)
    for name, view in views.items():
        grad = getattr(view.experts, view.param).grad[view.index]
        assert torch.equal(grad != 0, masks[name]), name
