"""LoRA recovery: adapters on the pruned layers, and a merge that keeps exactly the base model's zeros."""

from __future__ import annotations

import copy

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader

import prunekit
from prunekit.errors import PrunekitError
from prunekit.finetune import CausalLMModule, add_lora, keep_masks, lora_targets, merge_lora_keep_sparsity
from tests.conftest import tiny_llama

LLAMA_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def train(module, steps: int = 4) -> None:
    ids = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(0))
    data = DataLoader([{"input_ids": row} for row in ids], batch_size=4)
    L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, data)


def zeros(model, masks) -> int:
    layers = dict(model.named_modules())
    return sum(int((layers[n].weight == 0).sum()) for n in masks)


def test_lora_targets_are_the_pruned_linears_not_the_head():
    assert lora_targets(tiny_llama()) == LLAMA_LINEARS


def test_merge_keeps_exactly_the_base_sparsity_and_keys():
    model = tiny_llama()
    keys = list(model.state_dict())
    prunekit.prune(model, "magnitude", 0.5)
    masks = keep_masks(model)
    assert len(masks) == 14 and all(not bool(m.all()) for m in masks.values())
    before = {n: dict(model.named_modules())[n].weight.detach().clone() for n in masks}
    adapted = add_lora(model, r=4, alpha=8)
    train(CausalLMModule(adapted, lr=1e-2))
    plain = copy.deepcopy(adapted).merge_and_unload()
    assert zeros(plain, masks) < sum(int((~m).sum()) for m in masks.values())  # dense delta fills zeros

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        trained = adapted(input_ids=ids).logits
    merged = merge_lora_keep_sparsity(adapted, masks)
    with torch.no_grad():  # re-masking drops what the dense delta learned at pruned positions
        assert not torch.allclose(merged(input_ids=ids).logits, trained, atol=1e-3)
    layers = dict(merged.named_modules())
    assert list(merged.state_dict()) == keys
    for name, mask in masks.items():
        weight = layers[name].weight.detach()
        assert torch.equal(weight != 0, mask)
    assert any(not torch.equal(layers[n].weight[masks[n]], before[n][masks[n]]) for n in masks)  # LoRA did train


def test_merge_rejects_masks_of_other_layers():
    model = tiny_llama()
    adapted = add_lora(model, r=2)
    with pytest.raises(PrunekitError, match="keep_masks"):
        merge_lora_keep_sparsity(adapted, {"model.layers.9.mlp.up_proj": torch.ones(1, dtype=torch.bool)})


def test_masked_delta_training_merges_into_exactly_the_trained_model():
    model = tiny_llama()
    prunekit.prune(model, "magnitude", 0.5)
    masks = keep_masks(model)
    adapted = add_lora(model, r=4, alpha=8, masks=masks)
    train(CausalLMModule(adapted, lr=1e-2))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        trained = adapted(input_ids=ids).logits
        merged = merge_lora_keep_sparsity(adapted, masks)
        assert torch.allclose(merged(input_ids=ids).logits, trained, atol=1e-5)
    layers = dict(merged.named_modules())
    assert all(torch.equal(layers[n].weight != 0, m) for n, m in masks.items())


def test_masked_delta_rejects_dropout():
    model = tiny_llama()
    try:
        add_lora(model, r=2, dropout=0.1, masks=keep_masks(model, names=["model.layers.0.mlp.up_proj"]))
    except ValueError as err:
        assert "dropout" in str(err)
    else:
        raise AssertionError("expected a ValueError")
