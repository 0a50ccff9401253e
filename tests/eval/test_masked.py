"""Masked-LM pseudo-perplexity, and the labeled perplexity the model classes without a plain one share."""

from __future__ import annotations

import pytest
import torch

from prunekit.data.inputs import IGNORE
from prunekit.errors import PrunekitError
from prunekit.eval.masked import mask_positions, masked_inputs
from prunekit.eval.perplexity import labeled_perplexity, perplexity
from tests import zoo


def test_fifteen_percent_hidden_the_same_every_time_never_a_special_token():
    windows = torch.randint(3, 100, (64, 128), generator=torch.Generator().manual_seed(0))
    windows[:, 0] = 1  # a special token opening every window
    hidden = mask_positions(windows, special_ids=[0, 1, 2])
    assert hidden.float().mean().item() == pytest.approx(0.15 * 127 / 128, abs=0.01)
    assert not hidden[:, 0].any()
    assert torch.equal(hidden, mask_positions(windows, special_ids=[0, 1, 2]))


def test_only_hidden_tokens_are_labels():
    windows = torch.arange(3, 403).view(4, 100)
    batches = masked_inputs(windows, mask_id=2, special_ids=[], batch_size=3)
    ids = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    hidden = labels != IGNORE
    assert bool((ids[hidden] == 2).all()) and torch.equal(labels[hidden], windows[hidden])
    assert torch.equal(ids[~hidden], windows[~hidden])
    with pytest.raises(PrunekitError, match="mask token"):
        masked_inputs(windows, mask_id=None, special_ids=[], batch_size=3)


def test_labeled_perplexity_of_a_decoder_is_its_perplexity():
    """With every token a label and the shift of a decoder, the labeled perplexity is the windowed one."""
    model = zoo.build("llama")
    windows = zoo.token_ids(batch_size=4, seqlen=16)
    batches = [{"input_ids": w, "labels": w} for w in windows.split(2)]
    expected = perplexity(model, windows.reshape(-1), seqlen=16, batch_size=2)
    assert labeled_perplexity(model, batches, shift=True) == pytest.approx(expected, rel=1e-5)
