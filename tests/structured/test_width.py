"""Width pruning: removing heads / KV groups / channels equals zeroing their weights in the original, GQA
groups stay whole, the parameter budget is met, and the smaller LLaMA saves and loads."""

import copy

import pytest
import torch

from prunekit.structured import STRUCTURED
from prunekit.structured.coupling import Group, Slot
from prunekit.structured.width import Width, channel_taylor, channels_to_remove, taylor_salience, unit_scores
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


@pytest.mark.parametrize(
    "params, match",
    [
        ({"score": "fisher"}, "wanda, magnitude, taylor"),
        ({"head_ratio": 1.0}, "head_ratio"),
        ({"score": "taylor", "taylor": "param_third"}, "param_first"),
        ({"taylor": "param_first"}, "score=taylor only"),
        ({"checkpointing": False}, "score=taylor only"),
        ({"reduction": "median"}, "sum, mean, max, prod, last"),
        ({"layers": "one-two"}, "not a block list"),
        ({"head_layers": [-1]}, "non-negative"),
        ({"alignment": "interleaved"}, "grouped, strided"),
    ],
)
def test_bad_parameters_are_errors(params, match):
    with pytest.raises(ValueError, match=match):
        STRUCTURED.create("width", params)


def test_a_block_past_the_last_is_an_error_before_any_work(token_batch):
    model = tiny_llama(layers=2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="names block 2, but the model has blocks 0-1"):
        Width(layers="1-2").prune_model(model, [token_batch], 0.2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- Taylor scores (LLM-Pruner)

W = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
G = torch.tensor([[0.5, 1.0], [-1.0, 2.0]])
FISHER = torch.tensor([[1.0, 0.5], [2.0, 0.25]])


@pytest.mark.parametrize(
    "taylor, rows, columns",
    [
        # |w g| = [[0.5, 2], [3, 8]]
        ("param_first", [2.5, 11.0], [3.5, 10.0]),
        # w g = [[0.5, -2], [-3, 8]]: |row sums|, |column sums|
        ("vectorize", [1.5, 5.0], [2.5, 6.0]),
        # w F w = [[1, 2], [18, 4]]
        ("param_second", [3.0, 22.0], [19.0, 6.0]),
        # w g - w F w / 2 = [[0, -3], [-12, 6]]
        ("param_mix", [3.0, 18.0], [12.0, 9.0]),
    ],
)
def test_taylor_formulas_by_hand(taylor, rows, columns):
    salience = taylor_salience(W, G, FISHER, taylor)
    vectorize = taylor == "vectorize"
    assert channel_taylor(salience, 0, vectorize).tolist() == rows
    assert channel_taylor(salience, 1, vectorize).tolist() == columns


def _hand_group() -> Group:
    """Two KV groups of 2 query heads of head_dim 2: q rows 0-3 / 4-7, k rows 0-1 / 2-3, o columns as q."""
    q_index, kv_index = torch.arange(8).view(2, 4), torch.arange(4).view(2, 2)
    layer = torch.nn.Linear(1, 1)
    slots = [Slot("q", layer, 0, q_index), Slot("k", layer, 0, kv_index), Slot("o", layer, 1, q_index)]
    return Group("attn", "heads", slots)


@pytest.mark.parametrize(
    "reduction, expected",
    [
        # per head_dim position: q (its 2 query heads added) [[4, 6], [12, 14]], k [[10, 20], [30, 40]],
        # o [[2, 2], [4, 4]]; then the positions summed
        ("sum", [44.0, 104.0]),
        ("mean", [44.0 / 3, 104.0 / 3]),
        ("max", [30.0, 70.0]),
        ("prod", [4 * 10 * 2 + 6 * 20 * 2, 12 * 30 * 4 + 14 * 40 * 4]),
        ("last", [4.0, 8.0]),
    ],
)
def test_group_reductions_by_hand(reduction, expected):
    channels = {
        "q": torch.arange(1.0, 9.0),
        "k": torch.tensor([10.0, 20.0, 30.0, 40.0]),
        "o": torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]),
    }
    assert unit_scores(_hand_group(), channels, reduction).tolist() == pytest.approx(expected)


def test_strided_alignment_is_llm_pruners_fold():
    """LLM-Pruner folds q / o (8 channels) onto k's 4 as rows [1, 2, 3, 4] + [5, 6, 7, 8]: KV group 0 gets
    positions 0-1 of both halves (query heads 0 and 2), not its own query heads 0 and 1."""
    channels = {
        "q": torch.arange(1.0, 9.0),
        "k": torch.tensor([10.0, 20.0, 30.0, 40.0]),
        "o": torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]),
    }
    # q -> [[6, 8], [10, 12]], k -> [[10, 20], [30, 40]], o -> [[3, 3], [3, 3]]
    assert unit_scores(_hand_group(), channels, "sum", "strided").tolist() == [50.0, 98.0]


def _direct_taylor(model, batch) -> dict[str, torch.Tensor]:
    """|w g| summed over each KV group's and MLP channel's weights, from one backward pass of the mean loss."""
    model.zero_grad()
    model(batch, labels=batch).loss.backward()
    cfg = model.config
    hd, rep = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    found = {}
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        s = {
            name: (p.weight * p.weight.grad).abs()
            for name, p in [*a.named_children(), *m.named_children()]
            if hasattr(p, "weight")
        }
        heads = []
        for g in range(cfg.num_key_value_heads):
            q, kv = slice(g * rep * hd, (g + 1) * rep * hd), slice(g * hd, (g + 1) * hd)
            heads.append(s["q_proj"][q].sum() + s["k_proj"][kv].sum() + s["v_proj"][kv].sum() + s["o_proj"][:, q].sum())
        found[f"model.layers.{i}.self_attn"] = torch.stack(heads)
        found[f"model.layers.{i}.mlp"] = s["gate_proj"].sum(1) + s["up_proj"].sum(1) + s["down_proj"].sum(0)
    model.zero_grad()
    return {k: v.detach() for k, v in found.items()}


def test_taylor_width_removes_the_units_a_direct_computation_ranks_lowest(token_batch):
    model = tiny_llama(layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64)
    direct = _direct_taylor(copy.deepcopy(model), token_batch)
    original = copy.deepcopy(model)
    summary = Width(score="taylor", head_ratio=0.5).prune_model(model, [token_batch[:3], token_batch[3:]], 0.3)
    for name, units in summary["removed_units"].items():
        lowest = torch.argsort(direct[name])[: len(units["removed"])]
        assert units["removed"] == sorted(lowest.tolist()), name
    assert summary["gradient_windows"] == 8 and "gradient_memory" in summary
    _zero_llama_units(original, summary["removed_units"])
    with torch.no_grad():
        torch.testing.assert_close(model(token_batch).logits, original(token_batch).logits, atol=1e-5, rtol=1e-5)


def test_taylor_needs_a_loss():
    model = _tiny_vit()
    with pytest.raises(ValueError, match="own loss"):
        Width(score="taylor").prune_model(model, [torch.randn(2, 3, 32, 32)], 0.2)


def test_a_layer_range_prunes_only_those_blocks_and_meets_their_budget(token_batch):
    model = tiny_llama(layers=4, hidden=32, heads=4, kv_heads=2, intermediate=64)
    original = copy.deepcopy(model)
    summary = Width(layers="1-2", head_ratio=0.5).prune_model(model, [token_batch], 0.3)
    layers = model.model.layers
    assert [layer.mlp.gate_proj.out_features < 64 for layer in layers] == [False, True, True, False]
    assert [layer.self_attn.k_proj.out_features for layer in layers] == [16, 8, 8, 16]
    in_range = sum(p.numel() for i in (1, 2) for p in original.model.layers[i].parameters())
    removed = summary["params_before"] - summary["params_after"]
    assert removed / in_range == pytest.approx(0.3, abs=0.02)
    assert summary["pruned_blocks"] == {"heads": [1, 2], "channels": [1, 2]}
    assert "prunekit.load" in summary["reload"] and summary["layer_sizes"][0] == {}
    _zero_llama_units(original, {**_whole(original), **summary["removed_units"]})
    with torch.no_grad():
        torch.testing.assert_close(model(token_batch).logits, original(token_batch).logits, atol=1e-5, rtol=1e-5)


def _whole(model) -> dict:
    return {
        f"model.layers.{i}.{part}": {"removed": []}
        for i in range(len(model.model.layers))
        for part in ("self_attn", "mlp")
    }
