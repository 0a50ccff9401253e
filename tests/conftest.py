"""Shared test helpers: tiny random models built in-process, and the offline fixtures (skipped if absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

FIXTURES = (Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures").resolve()

# One intra-op thread per test process (PRUNEKIT_TEST_THREADS=N for more). With two, every parallel op ends at
# a barrier where one OpenMP thread spins waiting for its partner; on a 2-core machine shared with other work
# the partner is often descheduled, and tests ran 3-5x slower (measured under the same load: the dense fixture
# perplexity 125-174 s with 2 threads in three runs of four, 35-53 s with 1; test_cnn_coverage + test_api 90 s
# vs 28 s). Spawned processes (DDP tests, the README quick start) inherit OMP_NUM_THREADS.
TEST_THREADS = int(os.environ.get("PRUNEKIT_TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))
torch.set_num_threads(TEST_THREADS)
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")  # tests never download


def fixture_path(*parts: str) -> Path:
    """A path inside ../shared/fixtures, skipping the test cleanly when the fixtures are not there."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"fixture {path} not available")
    return path


def tiny_llama(
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 64,
    vocab: int = 128,
    seed: int = 0,
):
    """A random LlamaForCausalLM small enough for unit tests (grouped-query attention on by default)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def token_batch():
    return torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ the trained fixtures, loaded once per session
# Tokenising kjv/train.txt takes seconds and the dense perplexity on the whole test split tens of seconds: each is
# computed once here and shared. Models are cheap to reload (from_pretrained after the first is ~0.1 s), so tests
# load their own copy and may modify it.

KJV_SEQLEN = 256  # METRICS.md's perplexity protocol: non-overlapping 256-token windows over kjv/test.txt


def load_kjv_llama():
    """A fresh kjv-llama-5m (eval mode) that the caller may prune."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(fixture_path("kjv-llama-5m")).eval()


# The LayerNorm fixture, committed with the tests (benchmarks/make_kjv_opt.py made it): an OPTForCausalLM trained on
# kjv/train.txt with kjv-llama-5m's tokenizer.
KJV_OPT = Path(__file__).resolve().parent / "assets" / "kjv-opt-2m"


def load_kjv_opt():
    """A fresh kjv-opt-2m (eval mode, float32) that the caller may prune."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(KJV_OPT, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def kjv_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fixture_path("kjv-llama-5m"))


@pytest.fixture(scope="session")
def kjv_test_tokens(kjv_tokenizer) -> torch.Tensor:
    """All of kjv/test.txt, tokenised as prunekit.data does it (1-D)."""
    from prunekit.data import load_text, tokenize

    return tokenize(kjv_tokenizer, load_text(fixture_path("kjv", "test.txt")))


@pytest.fixture(scope="session")
def kjv_train_tokens(kjv_tokenizer) -> torch.Tensor:
    """All of kjv/train.txt, tokenised as prunekit.data does it (1-D)."""
    from prunekit.data import load_text, tokenize

    return tokenize(kjv_tokenizer, load_text(fixture_path("kjv", "train.txt")))


@pytest.fixture(scope="session")
def kjv_dense_ppl(kjv_test_tokens) -> float:
    """The dense kjv-llama-5m's perplexity by METRICS.md's protocol (the whole test split, 256-token windows)."""
    from prunekit.eval import perplexity

    return perplexity(load_kjv_llama(), kjv_test_tokens, KJV_SEQLEN)
