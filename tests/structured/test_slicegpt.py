"""SliceGPT-style slicing: the rotation alone changes nothing, the sliced model is a plain LlamaForCausalLM that
loads back, and the rescaled RMSNorm over d' equals SliceGPT's norm with the mean over the original d."""

import pytest
import torch
from torch import nn

from prunekit.structured import slicegpt
from prunekit.structured.slicegpt import SliceGPT, rescale_norm, sliced_dim
from tests.conftest import tiny_llama


def _tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def _random_norm_scales(model) -> None:
    """Random RMSNorm scales, so that folding them into the readers is actually exercised."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))


@pytest.mark.parametrize("make", [tiny_llama, _tied_llama])
def test_rotation_without_slicing_leaves_outputs_unchanged(make, token_batch):
    model = make()
    _random_norm_scales(model)
    with torch.no_grad():
        before = model(token_batch).logits
    summary = SliceGPT().prune_model(model, [token_batch], 0.0)
    assert summary["hidden_after"] == 32 and summary["variance_kept"] == pytest.approx(1.0)
    assert not model.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(model(token_batch).logits, before, atol=1e-4, rtol=1e-4)
        # the rotation really happened: the embedding is no longer the original one
        assert not torch.allclose(model.model.embed_tokens.weight, make().model.embed_tokens.weight, atol=1e-3)


def test_sliced_model_is_smaller_and_loads_back(tmp_path, token_batch):
    from transformers import AutoModelForCausalLM

    model = _tied_llama()
    summary = SliceGPT().prune_model(model, [token_batch], 0.25)
    assert summary["hidden_after"] == 24 and summary["removed_fraction"] == pytest.approx(0.25, abs=0.01)
    assert model.config.hidden_size == 24 and model.config.head_dim == 8
    assert model.config.rms_norm_eps == pytest.approx(1e-6 * 32 / 24)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.model.embed_tokens.weight.shape == (128, 24)
    with torch.no_grad():
        assert torch.equal(loaded(token_batch).logits, model(token_batch).logits)


def test_rescaled_norm_equals_rmsn_over_original_width():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    d, d_new, eps = 32, 20, 1e-2
    norm = LlamaRMSNorm(d_new, eps=eps)
    rescale_norm(norm, d, d_new)
    x = torch.randn(5, d_new, generator=torch.Generator().manual_seed(0))
    expected = x / torch.sqrt(x.square().sum(-1, keepdim=True) / d + eps)  # SliceGPT's RMSN(mean_dim=d)
    torch.testing.assert_close(norm(x), expected)


def _sliced_error(model, batch) -> float:
    with torch.no_grad():
        dense = model(batch).logits
        SliceGPT().prune_model(model, [batch], 0.25)
        return ((model(batch).logits - dense).norm() / dense.norm()).item()


def test_slicing_keeps_the_top_principal_components(token_batch, monkeypatch):
    """Dropping the weakest PCA directions must hurt far less than dropping the strongest ones."""
    top = _sliced_error(tiny_llama(layers=2), token_batch)
    original = slicegpt.principal_axes
    monkeypatch.setattr(slicegpt, "principal_axes", lambda cov: tuple(t.flip(-1) for t in original(cov)))
    bottom = _sliced_error(tiny_llama(layers=2), token_batch)
    assert top < bottom / 2


class _OnePlusRMSNorm(nn.Module):
    """Gemma-style norm: ``(1 + weight) * x / rms(x)``; folding ``weight`` alone would be wrong."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.variance_epsilon)


def test_unsupported_norm_is_refused_before_any_change(token_batch):
    model = tiny_llama()
    model.model.layers[0].input_layernorm = _OnePlusRMSNorm(32)
    weight = model.model.embed_tokens.weight.clone()
    with pytest.raises(ValueError, match="llama: slicegpt needs one RMSNorm formula"):
        SliceGPT().prune_model(model, [token_batch], 0.25)
    assert torch.equal(model.model.embed_tokens.weight, weight)


@pytest.mark.parametrize(
    "d, ratio, round_to, expected", [(256, 0.1, 1, 230), (256, 0.3, 8, 176), (32, 0.99, 8, 8), (256, 0.0, 100, 256)]
)
def test_sliced_dim(d, ratio, round_to, expected):
    assert sliced_dim(d, ratio, round_to) == expected


def test_sliced_dim_is_one_the_config_accepts(token_batch):
    """4 heads: LlamaConfig wants hidden % 4 == 0, so 20% of 32 (25.6) becomes 24, not 26."""
    model = tiny_llama()
    assert SliceGPT().prune_model(model, [token_batch], 0.2)["hidden_after"] == 24
    model.config.validate()
