"""On the trained kjv-llama-5m: each structural method at 20% gives a checkpoint that reloads as a plain
LlamaForCausalLM with the promised size and a perplexity close to the dense model's. On the trained LayerNorm
fixture kjv-opt-2m: SliceGPT at 25% of the hidden width gives a smaller OPTForCausalLM that prunekit.load reads
back exactly, at a perplexity close to the dense model's."""

import json
from pathlib import Path

import pytest
import torch

from prunekit.data import calibration_batches, random_windows
from prunekit.eval import perplexity
from prunekit.structured import STRUCTURED
from tests.conftest import load_kjv_llama, load_kjv_opt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kjv(kjv_train_tokens, kjv_test_tokens):
    # = calibration_batches("kjv/train.txt", tokenizer, nsamples=16, seqlen=256, seed=0), on the session's tokens
    calib = calibration_batches(random_windows(kjv_train_tokens, 16, 256, 0))
    test = kjv_test_tokens[: 48 * 256]
    return calib, test, perplexity(load_kjv_llama(), test, 256)


@pytest.mark.parametrize("method", ["depth", "width", "slicegpt"])
def test_twenty_percent_reloads_and_keeps_quality(method, kjv, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    calib, test, dense_ppl = kjv
    model = load_kjv_llama()
    summary = STRUCTURED.create(method, {}).prune_model(model, calib, 0.2)
    assert abs(summary["removed_fraction"] - 0.2) < 0.06  # depth: 1 of 4 blocks = 25%
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LlamaForCausalLM
    assert sum(p.numel() for p in loaded.parameters()) == summary["model_params_after"]
    with torch.no_grad():
        assert torch.equal(loaded(test[None, :256]).logits, model(test[None, :256]).logits)
    assert perplexity(loaded, test, 256) < 1.5 * dense_ppl


def test_slicegpt_on_the_layernorm_fixture(kjv, tmp_path):
    from transformers import OPTForCausalLM

    import prunekit

    calib, test, _ = kjv  # kjv-opt-2m has kjv-llama-5m's tokenizer
    model = load_kjv_opt()
    dense_ppl = perplexity(model, test, 256)
    summary = STRUCTURED.create("slicegpt", {"slicing": "width"}).prune_model(model, calib, 0.25)
    assert (summary["hidden_before"], summary["hidden_after"], summary["norm"]) == (128, 96, "LayerNorm")
    assert summary["model_params_after"] < summary["model_params_before"]
    assert summary["removed_fraction"] == pytest.approx(0.25, abs=0.01)
    model.save_pretrained(tmp_path)
    loaded = prunekit.load(tmp_path)
    assert type(loaded) is OPTForCausalLM and loaded.config.prunekit_residual_width == 96
    assert sum(p.numel() for p in loaded.parameters()) == summary["model_params_after"]
    with torch.no_grad():
        assert torch.equal(loaded(test[None, :256]).logits, model(test[None, :256]).logits)
    assert perplexity(loaded, test, 256) < 1.05 * dense_ppl  # 1.014x on the whole test split (structured.md)


REFERENCE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "llm_pruner_reference.json"


@pytest.mark.parametrize("cell", range(4))
def test_taylor_width_makes_the_published_llm_pruner_choices(cell, kjv_train_tokens):
    """With LLM-Pruner's alignment and the same 10 x 64 windows, prunekit keeps exactly the heads and channels the
    published code kept (benchmarks/llm_pruner_reference.py records them) at the same parameter count."""
    run = json.loads(REFERENCE.read_text())["runs"][cell]
    assert run["taylor"] == "param_first"
    first, last = run["layers"]
    params = {"score": "taylor", "alignment": "strided", **({"layers": f"{first}-{last}"} if first else {})}
    model = load_kjv_llama()
    sparsity = {0.2: 0.1461, 0.5: 0.5}[run["ratio"]]
    summary = STRUCTURED.create("width", params).prune_model(
        model, [random_windows(kjv_train_tokens, 10, 64, 0)], sparsity
    )
    assert sum(p.numel() for p in model.parameters()) == run["params_after"]
    for key, ref in run["units"].items():
        block, kind = key.split(".")
        removed = summary["removed_units"][f"model.layers.{block}.{'self_attn' if kind == 'heads' else 'mlp'}"][
            "removed"
        ]
        assert [u for u in range(ref["units"]) if u not in removed] == ref["kept"], key
