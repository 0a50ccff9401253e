"""The Lightning perplexity recipe reports exactly the plain evaluator's perplexity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from prunekit.eval.lightning_ppl import TokenWindowDataModule, lightning_perplexity, run_ppl_eval_config
from prunekit.eval.perplexity import perplexity
from tests.conftest import fixture_path, load_kjv_llama, tiny_llama

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "llama-ppl-eval.yaml"
QUIET = dict(enable_progress_bar=False, accelerator="cpu")


def test_equals_plain_evaluator_on_a_tiny_llama():
    model = tiny_llama()
    tokens = torch.randint(0, 128, (16 * 10 + 7,), generator=torch.Generator().manual_seed(0))
    want = perplexity(model, tokens, seqlen=16, batch_size=4)
    for batch_size in (3, 10):  # uneven last batch, one batch
        got = lightning_perplexity(model, tokens, seqlen=16, batch_size=batch_size, **QUIET)
        assert got["ppl"] == pytest.approx(want, rel=1e-6)
        assert got["windows"] == 10 and got["tokens"] == 10 * 15


def test_max_windows_takes_the_first_windows():
    tokens = torch.arange(100)
    dm = TokenWindowDataModule(tokens, seqlen=10, batch_size=4, max_windows=3)
    assert torch.equal(dm.windows, tokens[:30].view(3, 10))
    with pytest.raises(ValueError, match="fewer than one window"):
        TokenWindowDataModule(tokens[:5], seqlen=10)


@pytest.mark.slow
def test_kjv_recipe_equals_plain_evaluator(tmp_path, kjv_test_tokens):
    """The shipped recipe on kjv-llama-5m (first 16 test windows, to stay fast) = prunekit.eval.perplexity."""
    source = fixture_path("kjv-llama-5m")
    test_text = fixture_path("kjv", "test.txt")
    out = run_ppl_eval_config(
        RECIPE,
        {
            "model": {"source": str(source)},
            "data": {"path": str(test_text), "max_windows": 16, "batch_size": 5},
            "trainer": QUIET,
            "results": str(tmp_path / "ppl.json"),
        },
    )
    config = yaml.safe_load(RECIPE.read_text())
    seqlen = config["data"]["seqlen"]
    tokens = kjv_test_tokens[: 16 * seqlen]
    want = perplexity(load_kjv_llama(), tokens, seqlen=seqlen, batch_size=8)
    assert out["ppl"] == pytest.approx(want, rel=1e-4)
    assert out["windows"] == 16 and out["tokens"] == 16 * (seqlen - 1)
    assert json.loads((tmp_path / "ppl.json").read_text())["ppl"] == out["ppl"]
