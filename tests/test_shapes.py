"""Checkpoints whose layers take their sizes from the stored weights (SliceGPT on classes that size attention from
``hidden_size``): ``resize_to`` gives each kind of layer the stored shapes, ``from_pretrained`` refuses such a
checkpoint and ``prunekit.load`` reads it back exactly."""

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import PrunekitError
from prunekit.graph import HFConv1D
from prunekit.shapes import RESIDUAL_WIDTH, checkpoint_sized_by_weights, resize_to
from prunekit.structured.slicegpt import SliceGPT
from tests import zoo


def test_resize_to_gives_each_layer_the_stored_shapes_and_sizes():
    model = nn.Sequential(nn.Linear(8, 6), HFConv1D(6, 8), nn.Embedding(10, 8), nn.LayerNorm(8))
    resize_to(model, {"0.weight": (6, 5), "1.weight": (5, 6), "1.bias": (6,), "2.weight": (10, 5), "3.weight": (5,)})
    linear, conv1d, embed, norm = model
    assert (linear.in_features, linear.out_features, linear.weight.shape) == (5, 6, (6, 5))
    assert (conv1d.nx, conv1d.nf) == (5, 6) and conv1d.bias.shape == (6,)
    assert embed.embedding_dim == 5 and norm.normalized_shape == (5,) and norm.bias.shape == (8,)
    resize_to(model, {"3.bias": (5,)})
    assert norm(torch.randn(2, 5)).shape == (2, 5)


def test_resize_to_refuses_a_layer_it_cannot_describe():
    with pytest.raises(PrunekitError, match="0: cannot give Conv2d the sizes its stored weights have"):
        resize_to(nn.Sequential(nn.Conv2d(3, 4, 3)), {"0.weight": (4, 2, 3, 3)})


@pytest.mark.parametrize("arch", ["gpt_neox"])  # its head is stored under the legacy name embed_out
def test_prunekit_load_reads_what_from_pretrained_refuses(arch, tmp_path):
    import transformers

    model, batch = zoo.build(arch), zoo.batch(arch, zoo.token_ids())
    summary = SliceGPT().prune_model(model, [batch], 0.25)
    assert summary["loads_with"] == "prunekit.load" and summary["config"][RESIDUAL_WIDTH] == 24
    model.save_pretrained(tmp_path)
    assert checkpoint_sized_by_weights(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded = prunekit.load(tmp_path)
    assert type(loaded) is type(model) and loaded.config.hidden_size == 32
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_lazy_skeleton_takes_the_stored_sizes(tmp_path):
    """``--lazy`` builds the model on meta from its config: a sliced checkpoint's layers get the stored sizes."""
    from prunekit.io.files import safetensors_shapes
    from prunekit.io.lazy import build_skeleton

    model = zoo.build("gpt2")
    SliceGPT().prune_model(model, [zoo.batch("gpt2", zoo.token_ids())], 0.25)
    model.save_pretrained(tmp_path)
    skeleton = build_skeleton(tmp_path)
    own = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    assert all(own[name] == shape for name, (_, shape) in safetensors_shapes(tmp_path).items())
    assert skeleton.transformer.ln_f.normalized_shape == (24,)
