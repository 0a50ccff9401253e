"""Blocks of different sizes (width pruning of a layer range): recorded in config.json, rebuilt by prunekit.load
(dense and compact checkpoints, the lazy skeleton), refused by plain from_pretrained, kept consistent by depth."""

import pytest
import torch

import prunekit
from prunekit.io.compact import convert
from prunekit.io.lazy import build_skeleton
from prunekit.structured import STRUCTURED
from prunekit.structured.layer_sizes import KEY, per_block_record
from tests.conftest import tiny_llama


def test_per_block_record_lists_only_what_differs():
    same = [{"intermediate_size": 40}] * 3
    assert per_block_record(same) == ({"intermediate_size": 40}, None)
    values, record = per_block_record([{"intermediate_size": 64}, {"intermediate_size": 40}, {"intermediate_size": 64}])
    assert values == {"intermediate_size": 64} and record == [{}, {"intermediate_size": 40}, {}]


@pytest.fixture
def ranged(token_batch):
    """A 4-block LLaMA whose blocks 1-2 lost a KV group and MLP channels, and block 0 MLP channels only."""
    model = tiny_llama(layers=4, hidden=32, heads=4, kv_heads=2, intermediate=64)
    params = {"head_layers": "1-2", "channel_layers": "0-2", "head_ratio": 0.5}
    STRUCTURED.create("width", params).prune_model(model, [token_batch], 0.3)
    return model


def test_different_sizes_reload_with_prunekit_load_only(ranged, tmp_path, token_batch):
    from transformers import AutoModelForCausalLM

    record = getattr(ranged.config, KEY)
    assert record[3] == {} and record[0] == {"intermediate_size": ranged.model.layers[0].mlp.gate_proj.out_features}
    assert record[1]["num_key_value_heads"] == 1 and ranged.config.num_key_value_heads == 2
    prunekit.save(ranged, tmp_path / "out")
    loaded = prunekit.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(token_batch).logits, ranged(token_batch).logits)
    with pytest.raises(Exception, match="(?i)size"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_the_compact_format_reloads_them_too(ranged, tmp_path, token_batch):
    ranged.save_pretrained(tmp_path / "dense")
    convert(tmp_path / "dense", tmp_path / "compact", to="compact")
    with torch.no_grad():
        assert torch.equal(prunekit.load(tmp_path / "compact")(token_batch).logits, ranged(token_batch).logits)


def test_the_lazy_skeleton_has_the_recorded_sizes(ranged, tmp_path):
    ranged.save_pretrained(tmp_path)
    skeleton = build_skeleton(tmp_path)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ranged.state_dict().items()}


def test_depth_after_width_keeps_the_record_consistent(ranged, tmp_path, token_batch):
    STRUCTURED.create("depth", {}).prune_model(ranged, [token_batch], 0.25)
    assert len(getattr(ranged.config, KEY)) == 3
    prunekit.save(ranged, tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(prunekit.load(tmp_path / "out")(token_batch).logits, ranged(token_batch).logits)


def test_equal_sizes_stay_a_plain_model(token_batch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(layers=2)
    summary = STRUCTURED.create("width", {"layers": "0-1"}).prune_model(model, [token_batch], 0.2)
    assert not hasattr(model.config, KEY) and summary["reload"] == "from_pretrained"
    model.save_pretrained(tmp_path)
    AutoModelForCausalLM.from_pretrained(tmp_path)
