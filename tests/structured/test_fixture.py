"""On the trained kjv-llama-5m: each structural method at 20% gives a checkpoint that reloads as a plain
LlamaForCausalLM with the promised size and a perplexity close to the dense model's."""
import pytest
import torch

from prunekit.data import calibration_batches, load_text, tokenize
from prunekit.eval import perplexity
from prunekit.structured import STRUCTURED
from tests.conftest import fixture_path

pytestmark = pytest.mark.slow


def _load():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(fixture_path("kjv-llama-5m")).eval()


@pytest.fixture(scope="module")
def kjv():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(fixture_path("kjv-llama-5m"))
    calib = calibration_batches(str(fixture_path("kjv", "train.txt")), tok, nsamples=16, seqlen=256, seed=0)
    test = tokenize(tok, load_text(fixture_path("kjv", "test.txt")))[: 48 * 256]
    return calib, test, perplexity(_load(), test, 256)


@pytest.mark.parametrize("method", ["depth", "width", "slicegpt"])
def test_twenty_percent_reloads_and_keeps_quality(method, kjv, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    calib, test, dense_ppl = kjv
    model = _load()
    summary = STRUCTURED.create(method, {}).prune_model(model, calib, 0.2)
    assert abs(summary["removed_fraction"] - 0.2) < 0.06  # depth: 1 of 4 blocks = 25%
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LlamaForCausalLM
    assert sum(p.numel() for p in loaded.parameters()) == summary["model_params_after"]
    with torch.no_grad():
        assert torch.equal(loaded(test[None, :256]).logits, model(test[None, :256]).logits)
    assert perplexity(loaded, test, 256) < 1.5 * dense_ppl
