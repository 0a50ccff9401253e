"""Width pruning: removing heads / KV groups / channels equals zeroing their weights in the original, GQA
groups stay whole, the parameter budget is met, and the smaller LLaMA saves and loads."""

import copy

import pytest
import torch

from prunekit.structured import STRUCTURED
from prunekit.structured.width import Width, channels_to_remove
from tests.conftest import tiny_llama


def _zero_llama_units(model, removed: dict) -> None:
    """Zero, by hand, every weight of the removed KV groups (with their query heads) and MLP channels."""
    cfg = model.config
    hd, rep = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for g in removed[f"model.layers.{i}.self_attn"]["removed"]:
                q, kv = slice(g * rep * hd, (g + 1) * rep * hd), slice(g * hd, (g + 1) * hd)
                attn.q_proj.weight[q] = 0
                attn.k_proj.weight[kv] = 0
                attn.v_proj.weight[kv] = 0
                attn.o_proj.weight[:, q] = 0
            for c in removed[f"model.layers.{i}.mlp"]["removed"]:
                mlp.gate_proj.weight[c] = 0
                mlp.up_proj.weight[c] = 0
                mlp.down_proj.weight[:, c] = 0


def test_llama_gqa_width_equals_masked_original(token_batch):
    model = tiny_llama(layers=2, hidden=48, heads=8, kv_heads=4, intermediate=64)  # head_dim 6
    original = copy.deepcopy(model)
    summary = Width().prune_model(model, [token_batch], 0.3)
    removed = summary["removed_units"]
    assert all(len(removed[f"model.layers.{i}.self_attn"]["removed"]) == 1 for i in range(2))
    assert model.config.num_key_value_heads == 3 and model.config.num_attention_heads == 6
    assert model.model.layers[0].self_attn.q_proj.out_features == 6 * 6
    _zero_llama_units(original, removed)
    with torch.no_grad():
        torch.testing.assert_close(model(token_batch).logits, original(token_batch).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_ratio, heads, kv_heads", [(None, 8, 4), (0.5, 4, 2)])
def test_head_count_is_one_the_config_accepts(head_ratio, heads, kv_heads, token_batch):
    """LlamaConfig rejects hidden 32 with 6 query heads: at 30% (1.2 of 4 KV groups) no group goes, as 1 would
    leave 6 heads and 2 would overshoot; MLP channels take the whole budget. head_ratio 0.5 removes 2 groups."""
    model = tiny_llama(layers=2, hidden=32, heads=8, kv_heads=4, intermediate=64)
    summary = Width(head_ratio=head_ratio).prune_model(model, [token_batch], 0.3)
    assert model.config.num_attention_heads == heads and model.config.num_key_value_heads == kv_heads
    assert summary["removed_fraction"] == pytest.approx(0.3, abs=0.01)
    model.config.validate()


def test_ratio_is_met_to_one_channel_step(token_batch):
    model = tiny_llama(layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64)
    summary = Width().prune_model(model, [token_batch], 0.25)
    per_channel = (
        3
        * 32
        / sum(
            p.numel()
            for p in tiny_llama(layers=1, hidden=32, heads=4, kv_heads=2, intermediate=64).model.layers.parameters()
        )
    )
    assert abs(summary["removed_fraction"] - 0.25) <= per_channel / 2 + 1e-9


def test_planted_weak_units_are_removed(token_batch):
    model = tiny_llama(layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    with torch.no_grad():  # KV group 1 = query heads 2,3 (rows 16:32), kv rows 8:16; MLP channel 7
        for w, sl in (
            (attn.q_proj.weight, slice(16, 32)),
            (attn.k_proj.weight, slice(8, 16)),
            (attn.v_proj.weight, slice(8, 16)),
        ):
            w[sl] *= 1e-3
        attn.o_proj.weight[:, 16:32] *= 1e-3
        for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
            w[7] *= 1e-3
        mlp.down_proj.weight[:, 7] *= 1e-3
    removed = Width(head_ratio=0.5).prune_model(model, [token_batch], 0.2)["removed_units"]
    assert removed["model.layers.0.self_attn"]["removed"] == [1]
    assert 7 in removed["model.layers.0.mlp"]["removed"]


def test_width_llama_saves_and_loads(tmp_path, token_batch):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64)
    Width(head_ratio=0.5, round_to=8).prune_model(model, [token_batch], 0.3)
    assert model.config.intermediate_size % 8 == 0 and model.config.intermediate_size < 64
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.head_dim == 8 and loaded.config.num_key_value_heads == 1
    with torch.no_grad():
        assert torch.equal(loaded(token_batch).logits, model(token_batch).logits)


def _tiny_vit():
    timm = pytest.importorskip("timm")
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10, pretrained=False
    ).eval()


def test_vit_width_equals_masked_original():
    model = _tiny_vit()
    original = copy.deepcopy(model)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    summary = Width().prune_model(model, [images], 0.4)
    removed = summary["removed_units"]
    dim, hd = 192, 64
    with torch.no_grad():
        for i, block in enumerate(original.blocks):
            for h in removed[f"blocks.{i}.attn"]["removed"]:
                for part in range(3):
                    rows = slice(part * dim + h * hd, part * dim + (h + 1) * hd)
                    block.attn.qkv.weight[rows] = 0
                    block.attn.qkv.bias[rows] = 0
                block.attn.proj.weight[:, h * hd : (h + 1) * hd] = 0
            for c in removed[f"blocks.{i}.mlp"]["removed"]:
                block.mlp.fc1.weight[c] = 0
                block.mlp.fc1.bias[c] = 0
                block.mlp.fc2.weight[:, c] = 0
        torch.testing.assert_close(model(images), original(images), atol=1e-5, rtol=1e-5)
    assert model.blocks[0].attn.num_heads == 2 and model.blocks[0].attn.qkv.out_features == 3 * 2 * hd
    assert model.blocks[0].mlp.fc1.out_features < 768


def test_magnitude_score_needs_no_data():
    model = tiny_llama()
    method = STRUCTURED.create("width", {"score": "magnitude"})
    assert not method.needs_calibration and Width().needs_calibration
    method.prune_model(model, [], 0.2)
    assert model.config.intermediate_size < 64


@pytest.mark.parametrize(
    "units, fraction, round_to, removed",
    [(64, 0.25, 1, 16), (64, 0.2, 8, 16), (64, 0.99, 8, 56), (10, 0.5, 4, 6), (10, 0.0, 4, 0)],
)
def test_channels_to_remove_keeps_multiples(units, fraction, round_to, removed):
    assert channels_to_remove(units, fraction, round_to) == removed


def test_bad_parameters_are_errors():
    with pytest.raises(ValueError, match="wanda, magnitude"):
        Width(score="taylor")
    with pytest.raises(ValueError, match="head_ratio"):
        Width(head_ratio=1.0)
