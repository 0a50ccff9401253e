"""Shared test helpers: tiny random models built in-process, and the offline fixtures (skipped if absent)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

FIXTURES = (Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures").resolve()

torch.set_num_threads(2)
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")  # tests never download


def fixture_path(*parts: str) -> Path:
    """A path inside ../shared/fixtures, skipping the test cleanly when the fixtures are not there."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"fixture {path} not available")
    return path


def tiny_llama(layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2, intermediate: int = 64,
               vocab: int = 128, seed: int = 0):
    """A random LlamaForCausalLM small enough for unit tests (grouped-query attention on by default)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def token_batch():
    return torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
