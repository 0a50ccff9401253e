"""Depth, width and SliceGPT over every architecture of the zoo: where supported, the pruned model is smaller,
reloads with identical logits (``from_pretrained``; ``prunekit.load`` for SliceGPT where the class sizes attention
from ``hidden_size``), and computes what the method promises (removed blocks =
skipped blocks, removed units = zeroed units, an unneeded slice = no change); where not, a one-line error that
names the architecture, raised before the model is touched."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from prunekit import architectures
from prunekit.errors import PrunekitError
from prunekit.graph import weight_matrix
from prunekit.structured import STRUCTURED, depth
from prunekit.structured.common import arch_name, block_list, count_params
from prunekit.structured.coupling import find_groups
from prunekit.structured.depth import rehearse, remove_blocks, skipping
from prunekit.structured.slicegpt import SliceGPT, find_layout, matrix, set_matrix
from prunekit.structured.width import Width, mlp_size_key
from tests import zoo
from tests.zoo.support import YES, prune_zoo_model, reloaded, same_logits

# Which structured method works where: the recorded support table (benchmarks/results/support.json, the README's
# table), which tests/test_architectures.py keeps true by rerunning every check.
RECORDED = json.loads((Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "support.json").read_text())
COLUMNS = {"depth": "depth", "width": "width", "slicegpt": "SliceGPT"}
SUPPORT = {arch: tuple(int(row[c] == YES) for c in COLUMNS.values()) for arch, row in RECORDED.items()}
METHODS = ("depth", "width", "slicegpt")
# Width removes heads (KV groups) here too; elsewhere head_dim is hidden_size / heads, or a q/k norm spans all heads.
HEADS = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "starcoder2", "llava"}
CASES = [(arch, m) for arch in SUPPORT for m in METHODS]
SUPPORTED = [(arch, m) for arch, m in CASES if SUPPORT[arch][METHODS.index(m)]]
REFUSED = [(arch, m) for arch, m in CASES if not SUPPORT[arch][METHODS.index(m)]]


def test_table_covers_the_zoo():
    assert set(SUPPORT) == set(zoo.ZOO)


def _params(arch: str, method: str) -> dict:
    return {"head_ratio": 0.5} if method == "width" and arch in HEADS else {}


def _logits(model, batch):
    with torch.no_grad():
        return zoo.output(model, batch)


@pytest.mark.parametrize("arch, method", SUPPORTED)
def test_supported_is_smaller_and_reloads_identically(arch, method):
    prefix, blocks = block_list(zoo.build(arch))
    model, batch, summary = prune_zoo_model(arch, method, 0.3, _params(arch, method))
    loaded = reloaded(model)
    assert type(loaded) is type(model)
    # the blocks shrink; the whole model may not: SliceGPT unties a tied head (Gemma), and the tiny models are
    # mostly embedding
    assert count_params(loaded.get_submodule(prefix)) == summary["params_after"] < count_params(blocks)
    assert count_params(loaded) == count_params(model) == summary["model_params_after"]
    assert same_logits(model, loaded, batch)
    if method == "width" and arch in HEADS:
        assert summary["config"]["num_key_value_heads"] == 1
    if zoo.ZOO[arch].kind == "causal":  # generation reads the KV cache by layer_idx
        prompt = batch["input_ids"][:1, :5]
        kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=zoo.EOS)
        assert torch.equal(loaded.generate(prompt, **kwargs), model.generate(prompt, **kwargs))


@pytest.mark.parametrize("arch, method", REFUSED)
def test_refused_with_one_line_error_before_any_change(arch, method):
    model, batch = zoo.build(arch), zoo.batch(arch, zoo.token_ids())
    config, state = model.config.to_dict(), {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunekitError) as err:
        STRUCTURED.create(method, {}).prune_model(model, [batch], 0.3)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{arch_name(model)}: ")
    assert model.config.to_dict() == config
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- what each method computes


def _droppable(arch: str) -> list[int]:
    n = len(block_list(zoo.build(arch))[1])
    return [i for i in range(n) if i not in depth.pinned_blocks(zoo.build(arch))]


@pytest.mark.parametrize("arch", [a for a, m in SUPPORTED if m == "depth"])
def test_removing_a_block_equals_skipping_it(arch):
    """Every kept block computes what it did in the full model (its own attention type, mask, rotary table)."""
    base, batch = zoo.build(arch), zoo.batch(arch, zoo.token_ids())
    prefix, _ = block_list(base)
    for i in _droppable(arch):
        model = copy.deepcopy(base)
        with skipping(list(block_list(model)[1]), [i]):
            expected = _logits(model, batch)
        remove_blocks(model, prefix, [i])
        torch.testing.assert_close(_logits(model, batch), expected, rtol=0, atol=1e-6)


def _zero_removed(model, removed: dict) -> None:
    """Zero, in the original model, every row and column of the units width pruning removed."""
    prefix, blocks = block_list(model)
    with torch.no_grad():
        for group in find_groups(prefix, blocks, mlp_size_key(model)):
            for slot in group.slots:
                index = slot.index[removed[group.name]["removed"]].flatten()
                if slot.dim == 0:
                    weight_matrix(slot.layer)[index] = 0
                    if slot.layer.bias is not None:
                        slot.layer.bias[index] = 0
                else:
                    weight_matrix(slot.layer)[:, index] = 0


@pytest.mark.parametrize("arch", [a for a, m in SUPPORTED if m == "width"])
def test_width_equals_the_original_with_removed_units_zeroed(arch):
    original = zoo.build(arch)
    model, batch, summary = prune_zoo_model(arch, "width", 0.3, _params(arch, "width"))
    assert summary["removed_fraction"] == pytest.approx(0.3, abs=0.02)
    _zero_removed(original, summary["removed_units"])
    torch.testing.assert_close(_logits(model, batch), _logits(original, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", [a for a, m in SUPPORTED if m == "width"])
def test_width_at_zero_changes_nothing(arch):
    original, batch = zoo.build(arch), zoo.batch(arch, zoo.token_ids())
    model, _, summary = prune_zoo_model(arch, "width", 0.0)
    assert summary["params_after"] == summary["params_before"]
    assert torch.equal(_logits(model, batch), _logits(original, batch))


def _random_norm_gains(model) -> None:
    """Norm weights away from their initial 1 (LLaMA) or 0 (Gemma) and LayerNorm shifts away from 0, so that
    folding them is exercised."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for norm in find_layout(model).norms():
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen) - 0.3)
            if getattr(norm, "bias", None) is not None:
                norm.bias.copy_(torch.randn(norm.bias.shape, generator=gen) / 2)


@pytest.mark.parametrize("arch", [a for a, m in SUPPORTED if m == "slicegpt"])
def test_slicegpt_at_zero_only_rotates(arch):
    model, batch = zoo.build(arch), zoo.batch(arch, zoo.token_ids())
    _random_norm_gains(model)
    before, embed = _logits(model, batch), model.get_input_embeddings().weight.clone()
    SliceGPT().prune_model(model, [batch], 0.0)
    assert not torch.allclose(model.get_input_embeddings().weight, embed, atol=1e-3)  # it did rotate
    torch.testing.assert_close(_logits(model, batch), before, rtol=1e-4, atol=1e-5)


def _low_rank_stream(model, rank: int) -> None:
    """Confine the residual stream to a random ``rank``-dim subspace that holds the all-ones vector: embeddings and
    every writer project onto it. Slicing to ``rank`` then loses nothing (a LayerNorm model keeps the all-ones
    direction and ``rank - 1`` others), so the sliced model must compute what the original did."""
    layout = find_layout(model)
    d = layout.embed.embedding_dim
    spanning = torch.randn(d, rank, generator=torch.Generator().manual_seed(0))
    spanning[:, 0] = 1.0
    basis, _ = torch.linalg.qr(spanning)
    projector = basis @ basis.T
    with torch.no_grad():
        for embed in layout.embeds:
            embed.weight.copy_(embed.weight @ projector)
        for writer in layout.writers():
            set_matrix(writer, projector.double() @ matrix(writer))
            if writer.bias is not None:
                writer.bias.copy_(writer.bias @ projector)


@pytest.mark.parametrize("arch", [a for a, m in SUPPORTED if m == "slicegpt"])
def test_slicing_a_low_rank_stream_is_lossless(arch):
    """Also checks Gemma's embedding scale, sqrt(hidden_size), which the smaller hidden_size changes."""
    model, batch = zoo.build(arch), zoo.batch(arch, zoo.token_ids())
    _random_norm_gains(model)
    _low_rank_stream(model, 24)
    before = _logits(model, batch)
    summary = SliceGPT(slicing="width").prune_model(model, [batch], 0.25)
    assert summary["hidden_after"] == 24 and model.get_input_embeddings().weight.shape[1] == 24
    # Qwen 3 keeps eps (its q/k norms share it), so does OPT (its config has no entry for it): a deviation of the
    # order eps / mean(x^2), large in a random tiny model
    tolerance = 1e-3 if arch in ("qwen3", "opt") else 1e-5
    torch.testing.assert_close(_logits(model, batch), before, rtol=tolerance, atol=tolerance)


# ---------------------------------------------------------------- per-layer configs


def _built(arch: str, **settings):
    import transformers

    spec = zoo.ZOO[arch]
    torch.manual_seed(0)
    return getattr(transformers, spec.model)(getattr(transformers, spec.config)(**{**spec.settings, **settings})).eval()


LAYER_CONFIGS = {
    "qwen2_moe": dict(num_hidden_layers=5, decoder_sparse_step=2, mlp_only_layers=[3]),
    "deepseek_v3": dict(num_hidden_layers=4, first_k_dense_replace=2),
    "gemma3": dict(num_hidden_layers=6, sliding_window_pattern=3),
    "qwen2": dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=4, max_window_layers=2),
    "gpt_oss": dict(num_hidden_layers=4),
}


@pytest.mark.parametrize("arch", list(LAYER_CONFIGS))
@pytest.mark.parametrize("drop", [[0], [1, 2]])
def test_per_layer_config_follows_the_kept_blocks(arch, drop):
    model, batch = _built(arch, **LAYER_CONFIGS[arch]), zoo.batch(arch, zoo.token_ids())
    prefix, blocks = block_list(model)
    with skipping(list(blocks), drop):
        expected = _logits(model, batch)
    remove_blocks(model, prefix, drop)
    torch.testing.assert_close(_logits(model, batch), expected, rtol=0, atol=1e-6)
    assert same_logits(model, reloaded(model), batch)


def test_qwen_moe_sparse_step_becomes_an_explicit_list():
    model = _built("qwen2_moe", **LAYER_CONFIGS["qwen2_moe"])  # sparse layers: 1 only (3 is listed dense)
    remove_blocks(model, "model.layers", [0])
    assert model.config.decoder_sparse_step == 1 and model.config.mlp_only_layers == [1, 2, 3]


def test_a_per_layer_rule_left_stale_is_refused(monkeypatch):
    """Without rewriting Qwen MoE's sparse step, the kept blocks would reload as other kinds: refused, unchanged."""
    model = _built("qwen2_moe", **LAYER_CONFIGS["qwen2_moe"])
    monkeypatch.setattr(depth, "_unroll_sparse_step", lambda config, n: None)
    with pytest.raises(PrunekitError, match="qwen2_moe: depth would leave a model its config cannot describe"):
        rehearse(model, "model.layers", [0])
    assert model.config.num_hidden_layers == 5 and len(model.model.layers) == 5


def test_t5_keeps_the_block_that_holds_the_position_bias(monkeypatch):
    model = zoo.build("t5")
    assert depth.pinned_blocks(model) == (0,)
    summary = depth.Depth().prune_model(model, [zoo.batch("t5", zoo.token_ids())], 0.6)
    assert 0 not in summary["removed_blocks"] and model.config.num_decoder_layers == 1
    t5 = architectures.FAMILIES["t5"]
    monkeypatch.setitem(architectures.FAMILIES, "t5", dataclasses.replace(t5, pinned_blocks=()))
    with pytest.raises(PrunekitError, match="relative_attention_bias"):
        rehearse(zoo.build("t5"), "decoder.block", [0])


def test_heads_that_cannot_go_are_an_error_when_asked_for():
    for arch, why in (("olmo2", "its q_norm normalises all heads together"), ("gpt2", "no attention")):
        model = zoo.build(arch)
        with pytest.raises(PrunekitError, match=f"{arch}: width pruning cannot remove attention heads: {why}"):
            Width(head_ratio=0.5).prune_model(model, [zoo.batch(arch, zoo.token_ids())], 0.3)
