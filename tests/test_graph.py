import pytest
import torch
from torch import nn

from prunekit.graph import find_blocks, find_layers, layer_type, select_layers, set_weight_matrix, weight_matrix
from tests.conftest import tiny_llama


def test_llama_layers_blocks_and_head_excluded():
    model = tiny_llama(layers=2)
    layers = find_layers(model)
    assert list(layers)[-1] == "lm_head"
    selected = select_layers(model)
    assert "lm_head" not in selected
    assert len(selected) == 2 * 7  # q k v o gate up down per decoder layer
    prefix, blocks = find_blocks(model)
    assert prefix == "model.layers" and len(blocks) == 2


def test_gpt2_conv1d_is_transposed_and_found():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32))
    selected = select_layers(model)
    assert "transformer.h.0.attn.c_attn" in selected and "lm_head" not in selected
    conv = selected["transformer.h.0.mlp.c_fc"]
    assert isinstance(conv, Conv1D)
    w = weight_matrix(conv)
    assert w.shape == (conv.nf, 32)  # [out, in] although Conv1D stores [in, out]
    assert find_blocks(model)[0] == "transformer.h"


def test_opt_blocks():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(
        OPTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=2,
            vocab_size=64,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
        )
    )
    assert find_blocks(model)[0] == "model.decoder.layers"


def test_timm_convnext_pointwise_convs_count_as_linear():
    import timm

    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    selected = select_layers(model)
    assert selected and all(layer_type(m) == "linear" for m in selected.values())
    assert "stem.0" not in selected and "head.fc" not in selected
    assert any(isinstance(m, nn.Conv2d) for m in selected.values())  # conv_mlp: 1x1 convs
    assert find_blocks(model)[0] == "stages"
    with_convs = select_layers(model, layer_types=["all"])
    assert any(m.groups > 1 for m in with_convs.values() if isinstance(m, nn.Conv2d))  # depthwise selectable


def test_timm_vit_blocks():
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=10
    )
    selected = select_layers(model)
    assert "patch_embed.proj" not in selected and "head" not in selected
    assert "blocks.0.attn.qkv" in selected and "blocks.1.mlp.fc2" in selected
    assert find_blocks(model)[0] == "blocks"


def test_torchvision_resnet_no_single_block_list():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    layers = find_layers(model)
    assert "conv1" in layers and "fc" in layers and "layer1.0.conv1" in layers
    selected = select_layers(model, layer_types=["all"])
    assert "conv1" not in selected and "fc" not in selected and "layer4.1.conv2" in selected
    assert find_blocks(model) is None  # four separate layerN lists: calibrated in one pass


def test_plain_sequential_include_exclude():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    assert list(select_layers(model)) == ["0", "2"]  # last layer is the head
    assert list(select_layers(model, exclude=["0"])) == ["2"]
    assert list(select_layers(model, include=["4"])) == ["4"]  # explicit include beats the head default


def test_transposed_conv_included_is_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 3), nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match="transposed convolution"):
        select_layers(model, include=["*"])


def test_unknown_layer_type():
    with pytest.raises(ValueError, match="unknown layer type"):
        select_layers(nn.Sequential(nn.Linear(2, 2)), layer_types=["dense"])


def test_set_weight_matrix_roundtrip_conv_and_conv1d():
    from transformers.pytorch_utils import Conv1D

    for module in (nn.Conv2d(4, 6, 3, groups=2), Conv1D(5, 3), nn.Linear(3, 5)):
        w = weight_matrix(module).detach().clone()
        set_weight_matrix(module, torch.zeros_like(w))
        assert (module.weight == 0).all()
        set_weight_matrix(module, w)
        assert torch.equal(weight_matrix(module), w)


# ---------------------------------------------------------------- issue 27: families beyond the LLaMA shape


@pytest.mark.parametrize(
    "name, lists",
    [("jamba", ["model.layers"]), ("mllama", ["model.vision_model.transformer.layers", "model.language_model.layers"])],
)
def test_hybrid_block_lists_are_found(name, lists):
    """Jamba mixes Mamba and attention layers, Mllama self- and cross-attention layers in one list: calibrated
    block by block like any other (they were one pass over the whole model)."""
    from prunekit.graph import find_stacks
    from tests import zoo

    assert [prefix for prefix, _ in find_stacks(zoo.build(name))] == lists


def test_a_bare_encoders_last_block_layer_is_no_head():
    """DINOv2 has no head: its last layer (inside the last block) was kept dense as one."""
    from tests import zoo

    model = zoo.build("dinov2")
    assert "encoder.layer.1.mlp.fc2" in select_layers(model)
    assert "classifier" not in select_layers(zoo.build("vit"))  # a classifier's head stays dense


@pytest.mark.parametrize("name", ["convnext", "clip", "wav2vec2"])
def test_models_without_token_embeddings(name):
    """transformers raises NotImplementedError from get_input_embeddings for them; the token-id check skipped it."""
    from prunekit import prune
    from prunekit.graph import input_embeddings
    from tests import zoo

    model = zoo.build(name)
    assert input_embeddings(model) is None
    prune(model, "wanda", 0.5, calib=[zoo.batch(name, zoo.token_ids())])
