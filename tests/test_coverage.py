"""Coverage: what share of the weights inside the blocks a run pruned, and a warning only when something no
setting excluded was left dense (issue 28 item 14: a recipe that kept depthwise convs dense on purpose warned
about its own choice, twice)."""

from __future__ import annotations

import logging

import torch
from torch import nn

import prunekit
from prunekit.cli import coverage_line
from tests.conftest import tiny_llama


class Block(nn.Module):
    def __init__(self, plain: bool):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.mixer = nn.Parameter(torch.randn(8, 8)) if not plain else None  # a matrix no walker prunes

    def forward(self, x):
        x = self.fc(x)
        return x @ self.mixer if self.mixer is not None else x


class Net(nn.Module):
    def __init__(self, plain: bool):
        super().__init__()
        self.blocks = nn.ModuleList(Block(plain) for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_weights_left_dense_that_no_setting_excluded_warn_once(caplog):
    with caplog.at_level(logging.WARNING):
        report = prunekit.prune(Net(plain=False), "magnitude", 0.5)
    assert "warning" in report.coverage and "blocks.0.mixer" in report.coverage["warning"]
    assert [r for r in caplog.records if "left dense" in r.getMessage()] != []
    assert "warning" not in coverage_line(report.coverage)  # logged once; the summary line does not repeat it


def test_weights_the_settings_exclude_are_reported_but_not_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        report = prunekit.prune(tiny_llama(), "magnitude", 0.5, exclude=["*.mlp.*"])
    assert "warning" not in report.coverage and not [r for r in caplog.records if "left dense" in r.getMessage()]
    left = report.coverage["left_dense"]
    assert left and all(item["reason"].startswith("not selected") for item in left)
    assert report.coverage["block_sparsity"] < 0.3  # the figure still says what was done
