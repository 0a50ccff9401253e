"""The gradients behind the Taylor scores: the model's own loss, one window at a time, equal to one backward pass
of the mean loss over all windows (LLM-Pruner's), the Fisher diagonal as the mean squared window gradient, the
same with block checkpointing, and a one-line refusal when the model has no loss for the batches."""

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.structured.gradients import accumulate_gradients, loss_kind, windows
from tests.conftest import tiny_llama


def _weights(model):
    layer = model.model.layers[0]
    return {"q": layer.self_attn.q_proj.weight, "down": layer.mlp.down_proj.weight}


def test_mean_gradient_and_fisher_equal_a_direct_computation(token_batch):
    model = tiny_llama().eval()
    params = _weights(model)
    got = accumulate_gradients(model, params, [token_batch[:5], token_batch[5:]], fisher=True)
    model.zero_grad()
    model(token_batch, labels=token_batch).loss.backward()  # the mean loss over all windows, in one pass
    per_window = []
    for row in token_batch:
        model.zero_grad()
        model(row[None], labels=row[None]).loss.backward()
        per_window.append({k: p.grad.clone() for k, p in params.items()})
    assert got.windows == 8
    for k in params:
        torch.testing.assert_close(got.grad[k], torch.stack([w[k] for w in per_window]).mean(0))
        torch.testing.assert_close(got.fisher[k], torch.stack([w[k] ** 2 for w in per_window]).mean(0))
    model.zero_grad()
    model(token_batch, labels=token_batch).loss.backward()
    for k, p in params.items():
        torch.testing.assert_close(got.grad[k], p.grad, rtol=1e-4, atol=1e-6)


def test_checkpointing_changes_nothing_and_the_model_is_left_as_it_was(token_batch):
    model = tiny_llama().eval()
    params = _weights(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    plain = accumulate_gradients(model, params, [token_batch])
    blocks = list(model.model.layers)
    checkpointed = accumulate_gradients(model, params, [token_batch], blocks=blocks)
    for k in params:
        torch.testing.assert_close(checkpointed.grad[k], plain.grad[k])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all("forward" not in vars(b) for b in blocks)
    assert plain.nbytes() == 4 * sum(p.numel() for p in params.values())


def test_padding_is_not_a_target(token_batch):
    model = tiny_llama().eval()
    params = _weights(model)
    mask = torch.ones_like(token_batch)
    mask[:, 12:] = 0
    padded = accumulate_gradients(model, params, [{"input_ids": token_batch, "attention_mask": mask}])
    model.zero_grad()
    labels = token_batch.clone()
    labels[:, 12:] = -100
    for row, row_labels, row_mask in zip(token_batch, labels, mask):
        model(row[None], attention_mask=row_mask[None], labels=row_labels[None]).loss.backward()
    for k, p in params.items():
        torch.testing.assert_close(padded.grad[k], p.grad / 8)


def test_a_labeled_pair_trains_a_plain_classifier_and_no_loss_is_refused():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    got = accumulate_gradients(model, {"w": model[2].weight}, [(x, y)])
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(got.grad["w"], model[2].weight.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(PrunekitError, match="needs the model's own loss"):
        loss_kind(model, x)


def test_windows_are_rows_of_every_batch_kind(token_batch):
    rows = list(windows([token_batch[:3], {"input_ids": token_batch[3:5], "attention_mask": token_batch[3:5]}]))
    assert len(rows) == 5
    assert torch.equal(rows[0], token_batch[:1]) and torch.equal(rows[4]["input_ids"], token_batch[4:5])


def _saved_bytes(model, ids, blocks) -> int:
    """Bytes autograd keeps for the backward pass of one loss (what checkpointing is meant to cut)."""
    from prunekit.structured.gradients import checkpointed, trainable

    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.enable_grad(), trainable(model, dict(model.named_parameters())), checkpointed(blocks):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids).loss
        loss.backward()
    return sum(saved)


def test_checkpointing_keeps_one_block_of_activations(token_batch):
    model = tiny_llama(layers=4).eval()
    plain = _saved_bytes(model, token_batch[:1], [])
    kept = _saved_bytes(model, token_batch[:1], list(model.model.layers))
    assert kept < plain / 3


def test_causal_lm_detection_follows_the_model_class_table():
    """``is_causal_lm`` reads transformers' mappings itself (the structured methods sit below the model-class table);
    they must be the mappings and name endings of the table's next-token classes."""
    from prunekit.model_classes import MODEL_CLASSES
    from prunekit.structured.gradients import CAUSAL_CLASSES, CAUSAL_MAPPINGS, CAUSAL_SUFFIXES

    assert CAUSAL_MAPPINGS == tuple(MODEL_CLASSES[name].mapping for name in CAUSAL_CLASSES)
    assert set(MODEL_CLASSES["causal-lm"].suffixes) <= set(CAUSAL_SUFFIXES)
