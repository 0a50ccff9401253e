"""Depth pruning: block scores find planted do-nothing blocks, removal keeps config and checkpoint consistent."""

import copy

import pytest
import torch
import torch.nn.functional as F

from prunekit.structured import STRUCTURED
from prunekit.structured.depth import Depth, blocks_to_remove, cosine_scores, ppl_scores, taylor_scores
from tests.conftest import tiny_llama


def _identity_block(model, index: int) -> None:
    """Zero the writers of block ``index``: its output equals its input (residual only)."""
    layer = model.model.layers[index]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def _nll(model, ids) -> float:
    logits = model(ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


@pytest.mark.parametrize("n, ratio, k", [(4, 0.1, 1), (4, 0.3, 1), (4, 0.4, 2), (4, 0.0, 0), (10, 0.25, 3)])
def test_blocks_to_remove_rounds_to_nearest_block(n, ratio, k):
    assert blocks_to_remove(n, ratio) == k


def test_blocks_to_remove_refuses_to_remove_everything():
    with pytest.raises(ValueError, match="leave none"):
        blocks_to_remove(4, 0.9)


def test_cosine_score_of_identity_block_is_zero_and_it_goes_first(token_batch):
    model = tiny_llama(layers=4)
    _identity_block(model, 2)
    scores = cosine_scores(model, list(model.model.layers), [token_batch])
    assert scores[2].abs() < 1e-5 and (scores[[0, 1, 3]] > 1e-3).all()
    summary = Depth("cosine").prune_model(model, [token_batch], 0.25)
    assert summary["removed_blocks"] == [2]


def test_ppl_scores_match_brute_force_removal(token_batch):
    model = tiny_llama(layers=3)
    _identity_block(model, 1)
    scores = ppl_scores(model, list(model.model.layers), [token_batch])
    dense = _nll(model, token_batch)
    for i in range(3):
        reduced = copy.deepcopy(model)
        reduced.model.layers = torch.nn.ModuleList([b for j, b in enumerate(reduced.model.layers) if j != i])
        assert scores[i] == pytest.approx(_nll(reduced, token_batch) - dense, abs=1e-4)
    assert scores[1].abs() < 1e-5
    summary = Depth("ppl").prune_model(model, [token_batch], 0.3)
    assert summary["removed_blocks"] == [int(torch.argmin(scores))]


def test_depth_round_trips_through_save_and_load(tmp_path, token_batch):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(layers=4)
    model.config.layer_types = ["full_attention"] * 4
    model.config.no_rope_layers = [10, 11, 12, 13]  # a per-layer list (SmolLM3); LLaMA ignores it
    summary = Depth("cosine").prune_model(model, [token_batch], 0.5)
    kept = [i for i in range(4) if i not in summary["removed_blocks"]]
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert model.config.layer_types == ["full_attention"] * 2
    assert model.config.no_rope_layers == [10 + i for i in kept]
    assert summary["removed_fraction"] == pytest.approx(0.5)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(token_batch).logits, model(token_batch).logits)
        prompt = token_batch[:1, :5]  # generation uses the KV cache, indexed by layer_idx
        assert torch.equal(
            loaded.generate(prompt, max_new_tokens=4, do_sample=False),
            model.generate(prompt, max_new_tokens=4, do_sample=False),
        )


def test_depth_on_timm_vit():
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=10, pretrained=False
    ).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    summary = STRUCTURED.create("depth", {}).prune_model(model, [images], 0.3)
    assert len(model.blocks) == 2 and len(summary["removed_blocks"]) == 1
    assert model(images).shape == (4, 10)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"score": "entropy"}, "cosine, ppl, taylor"),
        ({"keep_first": -1}, "negative"),
        ({"checkpointing": True}, "score=taylor only"),
    ],
)
def test_bad_parameters_are_errors(params, match):
    with pytest.raises(ValueError, match=match):
        STRUCTURED.create("depth", params)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_taylor_scores_equal_a_direct_computation(token_batch, checkpointing):
    """Shortened LLaMA's Taylor: sum |w g| over every parameter named weight in the block (matrices and norms)."""
    model = tiny_llama(layers=3)
    scores, nbytes = taylor_scores(model, list(model.model.layers), [token_batch[:4], token_batch[4:]], checkpointing)
    model.zero_grad()
    model(token_batch, labels=token_batch).loss.backward()
    for i, layer in enumerate(model.model.layers):
        direct = sum((p * p.grad).abs().sum() for n, p in layer.named_parameters() if "weight" in n)
        assert scores[i].item() == pytest.approx(direct.item(), rel=1e-4)
    assert nbytes == 4 * sum(p.numel() for p in model.model.layers.parameters())


def test_keep_first_and_last_pin_blocks(token_batch):
    model = tiny_llama(layers=4)
    _identity_block(model, 0)
    assert Depth("cosine").prune_model(copy.deepcopy(model), [token_batch], 0.25)["removed_blocks"] == [0]
    summary = Depth("taylor", keep_first=1, keep_last=1).prune_model(model, [token_batch], 0.25)
    assert summary["removed_blocks"] in ([1], [2]) and "gradient_memory" in summary
    with pytest.raises(ValueError, match="keep_first / keep_last"):
        Depth("cosine", keep_first=2, keep_last=1).prune_model(model, [token_batch], 0.5)


def test_depth_says_when_whole_blocks_round_the_ratio(caplog):
    """Issue 28 item 14: 0.20 of 4 blocks was silently 0.25."""
    import logging

    from prunekit.structured.depth import blocks_to_remove

    with caplog.at_level(logging.WARNING):
        assert blocks_to_remove(4, 0.2) == 1
    assert "0.2 of 4 blocks is 0.80 blocks, so 1 go (0.25 of the blocks)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert blocks_to_remove(4, 0.25) == 1
    assert caplog.text == ""
