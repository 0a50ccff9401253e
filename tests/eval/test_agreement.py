"""Accuracy, agreement and embedding similarity: the reference metrics of classifiers and encoders."""

from __future__ import annotations

import pytest
import torch

from prunekit.eval.agreement import fraction_equal, mean_cosine, mean_pooled


def test_fraction_equal_and_cosine():
    assert fraction_equal(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4])) == 0.75
    a = torch.randn(5, 8)
    assert mean_cosine(a, a) == pytest.approx(1.0)
    assert mean_cosine(a, -a) == pytest.approx(-1.0)


def test_mean_pooling_leaves_padding_out():
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    assert mean_pooled(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 2.0]]
