"""The architecture matrix: every family of ``tests.zoo`` (tiny random models built in-process from
transformers' own modeling code) through every capability check of ``tests.zoo.support``:

(a) at sparsity 0, the hidden states sequential calibration feeds each block equal the inputs that block
    receives in a plain forward pass (per-layer masks and rotary tables, encoder-decoder and vision-language
    stacks, MoE routing);
(b) Wanda 50% zeroes at least 49% of every weight matrix inside the blocks (experts included);
(c) pruned models save, reload with ``from_pretrained`` and give identical logits;
(d) ``prunekit prune`` from the command line on a saved copy;
plus N:M, SparseGPT and the structured methods, each either working or refused with one clear line.

The README's table of supported architectures is generated from ``benchmarks/results/support.json``; the test
fails when what prunekit does no longer matches it (regenerate: ``python benchmarks/support.py``, then
``python benchmarks/docs.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit import engine
from tests.zoo import ZOO, build
from tests.zoo.support import CAPABILITIES, YES, calibration, calibration_gap, check

ROOT = Path(__file__).resolve().parents[1]
RECORDED = json.loads((ROOT / "benchmarks" / "results" / "support.json").read_text())
ARCHITECTURES = sorted(ZOO)
EVERYWHERE = ("exact calibration", "unstructured", "N:M", "SparseGPT", "CLI")  # the acceptance (a)-(d)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_support_table_matches_what_prunekit_does(name):
    dense = build(name)
    row = {capability: check(name, capability, dense) for capability in CAPABILITIES}
    assert {c: row[c] for c in EVERYWHERE} == dict.fromkeys(EVERYWHERE, YES)
    assert row == RECORDED[name], "benchmarks/results/support.json is stale: run python benchmarks/support.py"


def test_every_architecture_is_in_the_table():
    assert set(RECORDED) == set(ZOO)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_block_zero_arguments_for_every_block_would_be_wrong(name, monkeypatch):
    """The calibration check can fail: calibrating every block with block 0's arguments (what prunekit did
    before) feeds Gemma's full-attention layers hidden states far from their real inputs."""
    monkeypatch.setattr(engine, "own_calls", lambda calls: [])
    assert calibration_gap(build(name), calibration(name)) > 0.05


def test_gemma3_blocks_get_their_own_masks_and_rotary_tables(caplog):
    with caplog.at_level("INFO", logger="prunekit.engine"):
        prunekit.prune(build("gemma3"), "wanda", 0.5, calib=calibration("gemma3"))
    assert "get other arguments than block 0" in caplog.text


@pytest.mark.parametrize("name", ["llava", "llama", "gemma3", "t5"])
def test_padded_batches_are_calibrated_exactly(name):
    """A padded batch gives blocks a real attention mask. LLaVA's language model also got a KV cache (its top-level
    config has no ``use_cache``): kept with the captured call, later calls attended to stale keys."""
    batches = calibration(name)
    for b in batches:
        mask = torch.ones_like(b["input_ids"])
        mask[1, 20:] = 0
        b["attention_mask"] = mask
    assert calibration_gap(build(name), batches) < 1e-5
