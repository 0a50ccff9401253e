"""SliceGPT-style slicing: the fold alone and the rotation alone change nothing (RMSNorm and LayerNorm models),
the sliced model is a plain model of its class that loads back, the rescaled norm over d' equals SliceGPT's norm
with the mean over the original d, and ``slicing`` says what ``--sparsity`` is a fraction of."""

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.structured import STRUCTURED, slicegpt
from prunekit.structured.common import block_list, count_params
from prunekit.structured.slicegpt import (
    LAYER_NORM,
    SliceGPT,
    find_layout,
    fold_all,
    matrix,
    ones_reflection,
    rescale_norm,
    rotation,
    sliced_dim,
    untie_head,
    width_per_params,
)
from tests import zoo
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
    with pytest.raises(ValueError, match="llama: slicegpt needs one norm formula"):
        SliceGPT().prune_model(model, [token_batch], 0.25)
    assert torch.equal(model.model.embed_tokens.weight, weight)


@pytest.mark.parametrize(
    "d, ratio, round_to, expected", [(256, 0.1, 1, 230), (256, 0.3, 8, 176), (32, 0.99, 8, 8), (256, 0.0, 100, 256)]
)
def test_sliced_dim(d, ratio, round_to, expected):
    assert sliced_dim(d, ratio, round_to) == expected


def test_sliced_dim_is_none_when_the_config_accepts_no_width():
    assert sliced_dim(32, 0.25, 1, lambda c: False) is None


def test_sliced_dim_is_one_the_config_accepts(token_batch):
    """4 heads: LlamaConfig wants hidden % 4 == 0, so 20% of 32 (25.6) becomes 24, not 26."""
    model = tiny_llama()
    assert SliceGPT().prune_model(model, [token_batch], 0.2)["hidden_after"] == 24
    model.config.validate()


# ---------------------------------------------------------------- LayerNorm models

LAYERNORM = ["gpt2", "opt", "falcon", "gpt_neox", "phi", "starcoder2"]


def _random_norms(model) -> None:
    """Norm scales away from 1 and LayerNorm shifts away from 0, so that folding both is exercised."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for norm in find_layout(model).norms():
            norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=gen))
            if getattr(norm, "bias", None) is not None:
                norm.bias.copy_(torch.randn(norm.bias.shape, generator=gen) / 2)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("arch", LAYERNORM + ["llama", "gemma"])
def test_fold_alone_keeps_the_logits(arch):
    """Before any rotation: the mean subtraction folded into the stream's writers (LayerNorm), the norms' scale and
    shift into their readers. The model, still its own class, computes the same logits; its norms are scale-free,
    its LayerNorm shifts ones, and the stream the norms read has no mean."""
    model, batch = zoo.build(arch), zoo.batch(arch, zoo.token_ids())
    _random_norms(model)
    before, layout = _logits(model, batch), find_layout(model)
    untie_head(model, layout, model.config)
    fold_all(layout)
    torch.testing.assert_close(_logits(model, batch), before, rtol=1e-5, atol=1e-5)
    for norm in layout.norms():
        assert torch.equal(norm.weight, torch.full_like(norm.weight, 1.0 - layout.formula.offset))
        if layout.formula.centred and norm.bias is not None:
            assert torch.equal(norm.bias, torch.ones_like(norm.bias))
    if layout.formula.centred:
        means = []
        hook = layout.final_norm.register_forward_pre_hook(lambda m, args: means.append(args[0].mean(-1).abs().max()))
        _logits(model, batch)
        hook.remove()
        assert means[0] < 1e-5
        assert all(matrix(w).mean(0).abs().max() < 1e-6 for w in layout.writers())


@pytest.mark.parametrize("arch", LAYERNORM)
def test_layernorm_models_need_no_new_bias(arch):
    """The shifts ride on the all-ones direction: no layer gains a bias it did not have (GPT-2's head has none)."""
    model = zoo.build(arch)
    had = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    SliceGPT().prune_model(model, [zoo.batch(arch, zoo.token_ids())], 0.25)
    assert {name for name, _ in model.named_parameters(remove_duplicate=False)} == had


def test_ones_reflection_swaps_the_all_ones_direction_with_the_first_axis():
    h = ones_reflection(6)
    torch.testing.assert_close(h, h.T)
    torch.testing.assert_close(h @ h, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(h[:, 0], torch.full((6,), 6**-0.5, dtype=torch.float64))


def test_layernorm_rotation_keeps_the_all_ones_direction_and_the_top_axes():
    """Q maps the all-ones direction of d onto that of d' (the sliced LayerNorms subtract a zero mean) and keeps the
    strongest zero-mean directions: on a stream confined to 3 of them it loses nothing at d' = 4."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 8, generator=gen, dtype=torch.float64)
    x = x - x.mean(1, keepdim=True)
    q, kept = rotation(x.T @ x, 4, LAYER_NORM)
    torch.testing.assert_close(q.T @ q, torch.eye(4, dtype=torch.float64))
    ones = torch.ones(8, dtype=torch.float64)
    torch.testing.assert_close(ones @ q, (8 / 4) ** 0.5 * torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(x @ q @ q.T, x)
    assert kept == pytest.approx(1.0)


def test_post_norm_blocks_under_pre_norm_names_are_refused_before_any_change():
    """OPT run with do_layer_norm_before=False: its norms have the pre-norm names but read x + sublayer(x)."""
    model, batch = zoo.build("opt"), zoo.batch("opt", zoo.token_ids())
    for layer in model.model.decoder.layers:
        layer.do_layer_norm_before = False
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunekitError, match=r"^opt: slicegpt needs pre-norm blocks, but the first norm of "):
        SliceGPT().prune_model(model, [batch], 0.25)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_projections_next_to_the_blocks_are_refused():
    """OPT-350m's project_in / project_out (word_embed_proj_dim != hidden_size) meet the stream where slicegpt does
    not rotate."""
    import transformers

    settings = dict(zoo.ZOO["opt"].settings, word_embed_proj_dim=16)
    model = transformers.OPTForCausalLM(transformers.OPTConfig(**settings)).eval()
    with pytest.raises(PrunekitError, match=r"^opt: slicegpt does not know how .*project_in.* meets the residual"):
        SliceGPT().prune_model(model, [zoo.batch("opt", zoo.token_ids())], 0.25)


# ---------------------------------------------------------------- what --sparsity is a fraction of


def test_width_slicing_is_the_papers_fraction_of_the_hidden_width(token_batch):
    summary = SliceGPT(slicing="width").prune_model(tiny_llama(), [token_batch], 0.25)
    assert summary["hidden_after"] == 24 and summary["slicing"] == "width"


def test_params_slicing_is_a_fraction_of_the_decoder_layer_parameters():
    """LLaMA: every block parameter scales with the width, so both readings agree. GPT-2: the readers' biases do not,
    so removing a quarter of the parameters takes more than a quarter of the width."""
    llama = tiny_llama()
    assert width_per_params(find_layout(llama), block_list(llama)[1], 0.25) == pytest.approx(0.25)
    gpt2 = zoo.build("gpt2")
    blocks = block_list(gpt2)[1]
    fraction = width_per_params(find_layout(gpt2), blocks, 0.25)
    assert 0.25 < fraction < 0.27
    before = count_params(blocks)
    summary = SliceGPT().prune_model(gpt2, [zoo.batch("gpt2", zoo.token_ids())], 0.25)
    assert summary["hidden_after"] == round(32 * (1 - fraction))
    assert summary["removed_fraction"] == pytest.approx((before - count_params(block_list(gpt2)[1])) / before)


def test_slicing_is_checked_when_the_config_is_made():
    from prunekit import PruneConfig

    with pytest.raises(PrunekitError, match="slicing must be 'params' .* or 'width'"):
        PruneConfig(method="slicegpt", method_params={"slicing": "hidden"})
    assert STRUCTURED.create("slicegpt", {"slicing": "width"}).slicing == "width"
