"""Mixture of experts: fused expert tensors are pruned per expert on the tokens routed to it; whole experts can
be removed. Every model is a tiny zoo model built from transformers' own modeling code."""

import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from prunekit import prune
from prunekit.collect import collect
from prunekit.errors import PrunekitError
from prunekit.graph import find_blocks, select_layers, set_weight_matrix, weight_matrix
from prunekit.io.compact import is_2_4
from prunekit.methods import METHODS
from prunekit.moe import ExpertWeight, calibrated_on, find_experts
from prunekit.report import build_report
from prunekit.structured.experts import EXPERT_COUNT_KEYS
from tests import zoo
from tests.conftest import tiny_llama

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3")
CALIB = dict(batch_size=2)


def _ids() -> torch.Tensor:
    return zoo.token_ids(4, 32)


def _prune(model, method="wanda", sparsity=0.5, **settings):
    return prune(model, method, sparsity, calib=_ids(), **CALIB, **settings)


def _linear_layout(experts: nn.Module, param: str, e: int) -> torch.Tensor:
    """Expert ``e``'s ``[out, in]`` matrix, read straight from transformers' layout flag (not through prunekit)."""
    w = getattr(experts, param)[e]
    return w.t() if experts.is_transposed else w


def _expert_matrices(model) -> dict[tuple[str, str, int], torch.Tensor]:
    return {
        (name, p, e): _linear_layout(m, p, e).detach().clone()
        for name, m in find_experts(model).items()
        for p in ("gate_up_proj", "down_proj")
        for e in range(getattr(m, p).shape[0])
    }


def _logits(model, name: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**zoo.batch(name, zoo.token_ids(2, 16, seed=7))).logits


def _reloaded(model, name: str, tmp_path):
    model.save_pretrained(tmp_path)
    return getattr(transformers, zoo.ZOO[name].model).from_pretrained(tmp_path).float().eval()


# ---------------------------------------------------------------- (a) per-expert Wanda = a plain reference


def _mlp_inputs(model) -> dict[int, torch.Tensor]:
    """The tokens each MoE block receives on the dense model, batch by batch as prune() feeds them."""
    seen: dict[int, list[torch.Tensor]] = {}
    handles = [
        layer.mlp.register_forward_pre_hook(
            lambda m, a, i=i: seen.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        for ids in _ids().split(CALIB["batch_size"]):
            model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return {i: torch.cat(x) for i, x in seen.items()}


def _keep_top_half(scores: torch.Tensor) -> torch.Tensor:
    """Per output row, keep the ``cols - floor(cols / 2)`` highest scores."""
    keep = scores.shape[1] - scores.shape[1] // 2
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, scores.topk(keep, dim=1).indices, True)


def _reference_wanda(model) -> dict[tuple[int, str, int], torch.Tensor]:
    """Each expert run as its own pair of nn.Linear on the tokens its block's router sends it."""
    masks = {}
    with torch.no_grad():
        for i, h in _mlp_inputs(model).items():
            mlp = model.model.layers[i].mlp
            _, _, chosen = mlp.gate(h)
            for e in range(mlp.experts.gate_up_proj.shape[0]):
                x = h[(chosen == e).any(dim=-1)]
                up = nn.Linear(x.shape[1], mlp.experts.gate_up_proj.shape[1], bias=False)
                down = nn.Linear(mlp.experts.down_proj.shape[2], x.shape[1], bias=False)
                up.weight.copy_(mlp.experts.gate_up_proj[e])
                down.weight.copy_(mlp.experts.down_proj[e])
                gate, lin = up(x).chunk(2, dim=-1)
                hidden = F.silu(gate) * lin
                masks[(i, "gate_up_proj", e)] = _keep_top_half(up.weight.abs() * x.norm(dim=0))
                masks[(i, "down_proj", e)] = _keep_top_half(down.weight.abs() * hidden.norm(dim=0))
    return masks


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_per_expert_wanda_equals_a_plain_per_expert_linear_reference(name):
    model = zoo.build(name)
    assert model.config.hidden_act == "silu"
    expected = _reference_wanda(model)
    _prune(model, include=["*.experts.*"], sequential=False)  # every block calibrated on the dense model
    for (i, param, e), mask in expected.items():
        got = getattr(model.model.layers[i].mlp.experts, param)[e] != 0
        assert torch.equal(got, mask), (i, param, e)


# ---------------------------------------------------------------- (b) every family, sparsity and reload


def _block_weight_sparsity(model, dense_on_purpose: set[str]) -> float:
    """Zeros over every weight matrix inside the blocks (attention, MLPs, fused experts, routers); biases and
    norms are not weight matrices; layers the report lists as kept dense on purpose are left out."""
    prefix, blocks = find_blocks(model)
    zeros = total = 0
    for name, p in blocks.named_parameters():
        module = f"{prefix}.{name}".rsplit(".", 1)[0]
        if p.dim() < 2 or name.endswith("bias") or module in dense_on_purpose:
            continue
        zeros, total = zeros + int((p == 0).sum()), total + p.numel()
    return zeros / total


@pytest.mark.parametrize("name", FAMILIES)
def test_wanda_prunes_half_of_every_block_weight_and_reloads(name, tmp_path):
    model = zoo.build(name)
    report = _prune(model)
    dense = set(report.experts["dense_gates"])
    assert dense and all(n.endswith(("gate", "router")) for n in dense)  # the routers, nothing else
    assert _block_weight_sparsity(model, dense) >= 0.49
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    assert any(".experts.down_proj." in n for n in report.layers)
    assert torch.equal(_logits(model, name), _logits(_reloaded(model, name, tmp_path), name))


# ---------------------------------------------------------------- (c) SparseGPT and 2:4 on experts


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_sparsegpt_reconstructs_each_expert(name):
    model = zoo.build(name)
    before = _expert_matrices(model)
    _prune(model, "sparsegpt", include=["*.experts.*"])
    for key, w in _expert_matrices(model).items():
        kept = w != 0
        assert kept.float().mean().item() == pytest.approx(0.5, abs=0.02), key
        assert not torch.allclose(w[kept], before[key][kept]), key  # kept weights were updated from X^T X


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_two_four_holds_along_each_experts_input_dimension(name):
    model = zoo.build(name)
    _prune(model, pattern="2:4", include=["*.experts.*"])
    for key, w in _expert_matrices(model).items():
        assert is_2_4(w), key
        assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.01), key


# ---------------------------------------------------------------- (d) expert_tokens="all"


def _collected(model, tokens: str):
    layers = calibrated_on(select_layers(model, include=["model.layers.0.mlp.experts.*"]), tokens)
    with collect(layers) as stats, torch.no_grad():
        logits = model(input_ids=_ids(), use_cache=False).logits
    return {n: stats[n] for n in layers}, logits, layers


def test_all_tokens_changes_the_statistics_but_not_the_routed_forward():
    model = zoo.build("mixtral")
    with torch.no_grad():
        plain = model(input_ids=_ids(), use_cache=False).logits
    routed, routed_logits, routed_layers = _collected(model, "routed")
    every, every_logits, every_layers = _collected(model, "all")
    assert torch.equal(routed_logits, plain) and torch.equal(every_logits, plain)
    total = _ids().numel()
    for n in routed:
        assert every[n].ntokens == total and every[n].nsamples == _ids().shape[0]
        assert 0 < routed[n].ntokens < total and routed[n].ntokens == routed_layers[n].routed_tokens
        assert every_layers[n].routed_tokens == routed_layers[n].routed_tokens  # routing unchanged
        assert not torch.allclose(every[n].sq_sum, routed[n].sq_sum)


def test_all_tokens_gives_other_masks_and_reports_the_same_routing():
    a, b = zoo.build("mixtral"), zoo.build("mixtral")
    ra, rb = _prune(a), _prune(b, expert_tokens="all")
    assert ra.experts["expert_tokens"] == "routed" and rb.experts["expert_tokens"] == "all"
    block0 = "model.layers.0.mlp.experts"
    assert ra.experts["routed_tokens"][block0] == rb.experts["routed_tokens"][block0]
    assert sum(ra.experts["routed_tokens"][block0]) == _ids().numel() * a.config.num_experts_per_tok
    masks = [a.model.layers[0].mlp.experts.down_proj != 0, b.model.layers[0].mlp.experts.down_proj != 0]
    assert not torch.equal(*masks)


# ---------------------------------------------------------------- (e) expert removal


def _reference_expert_scores(model) -> torch.Tensor:
    """Block 0 of Mixtral: sum over routed tokens of routing weight x ||expert output||, by plain Linears."""
    h = _mlp_inputs(model)[0]
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        _, weights, chosen = mlp.gate(h)
        scores = []
        for e in range(mlp.experts.gate_up_proj.shape[0]):
            hit = chosen == e
            x = h[hit.any(dim=-1)]
            gate, lin = F.linear(x, mlp.experts.gate_up_proj[e]).chunk(2, dim=-1)
            out = F.linear(F.silu(gate) * lin, mlp.experts.down_proj[e])
            scores.append(float(((weights * hit).sum(-1)[hit.any(-1)] * out.norm(dim=-1)).sum()))
    return torch.tensor(scores)


def test_expert_scores_match_a_plain_reference_and_the_lowest_go():
    model = zoo.build("mixtral")
    expected = _reference_expert_scores(model)
    report = _prune(model, "experts", 0.5)
    scores = torch.tensor(report.structure["expert_scores"]["model.layers.0.mlp.experts"])
    assert torch.allclose(scores, expected, rtol=1e-4)
    assert report.structure["removed_experts"]["model.layers.0.mlp.experts"] == sorted(expected.argsort()[:2].tolist())


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "deepseek_v3", "qwen2_moe"])
def test_expert_removal_updates_config_and_router_and_reloads(name, tmp_path):
    model = zoo.build(name)
    original = copy.deepcopy(model)
    report = _prune(model, "experts", 0.5)
    assert report.structure["experts_before"] == 4 and report.structure["experts_after"] == 2
    counts = {k: getattr(model.config, k) for k in EXPERT_COUNT_KEYS if hasattr(model.config, k)}
    assert counts and set(counts.values()) == {2}
    for experts_name, removed in report.structure["removed_experts"].items():
        keep = [e for e in range(4) if e not in removed]
        block = experts_name.rsplit(".", 1)[0]
        router = next(m for n, m in model.get_submodule(block).named_children() if n in ("gate", "router"))
        old_router = next(m for n, m in original.get_submodule(block).named_children() if n in ("gate", "router"))
        assert torch.equal(router.weight, old_router.weight[keep])
        for param in ("gate_up_proj", "down_proj"):
            new, old = (
                getattr(model.get_submodule(experts_name), param),
                getattr(original.get_submodule(experts_name), param),
            )
            assert torch.equal(new, old[keep])
    assert report.structure["params_after"] < report.structure["params_before"]
    assert torch.equal(_logits(model, name), _logits(_reloaded(model, name, tmp_path), name))


def test_expert_removal_without_experts_is_a_one_line_error():
    with pytest.raises(PrunekitError, match="mixture-of-experts") as err:
        prune(tiny_llama(), "experts", 0.5, calib=torch.randint(0, 128, (2, 16)))
    assert "\n" not in str(err.value)


def test_expert_removal_keeps_enough_experts_for_the_router():
    with pytest.raises(PrunekitError, match="fewer than the router needs"):
        _prune(zoo.build("mixtral"), "experts", 0.9)


# ---------------------------------------------------------------- walker, selection, report


def test_walker_lists_each_expert_as_a_matmul_and_keeps_routers_dense():
    model = zoo.build("gpt_oss")
    selected = select_layers(model)
    view = selected["model.layers.1.mlp.experts.gate_up_proj.3"]
    assert isinstance(view, ExpertWeight)
    stored = model.model.layers[1].mlp.experts.gate_up_proj[3]
    assert weight_matrix(view).shape == (stored.shape[1], stored.shape[0])  # [2I, H] although stored [H, 2I]
    set_weight_matrix(view, torch.zeros_like(weight_matrix(view)))
    assert not model.model.layers[1].mlp.experts.gate_up_proj[3].any()
    assert model.model.layers[1].mlp.experts.gate_up_proj[2].any()
    assert "model.layers.1.mlp.router" not in selected
    chosen = select_layers(model, include=["*.mlp.router"])
    assert list(chosen) == [f"model.layers.{i}.mlp.router" for i in range(3)]


def test_include_a_router_prunes_it_and_the_report_no_longer_lists_it_dense():
    model = zoo.build("mixtral")
    report = _prune(model, include=["*.experts.down_proj.*", "model.layers.0.mlp.gate"])
    assert (model.model.layers[0].mlp.gate.weight == 0).float().mean().item() == pytest.approx(0.5)
    assert not model.model.layers[1].mlp.gate.weight.eq(0).any()
    assert "model.layers.0.mlp.gate" not in report.experts["dense_gates"]
    assert not model.model.layers[0].mlp.experts.gate_up_proj.eq(0).any()  # excluded by the include list


def test_exclude_one_expert_keeps_it_dense():
    model = zoo.build("qwen3_moe")
    _prune(model, exclude=["*.experts.*.2"])
    experts = model.model.layers[0].mlp.experts
    assert not experts.gate_up_proj[2].eq(0).any() and not experts.down_proj[2].eq(0).any()
    assert experts.gate_up_proj[1].eq(0).float().mean().item() == pytest.approx(0.5)


def test_report_warns_about_experts_with_few_tokens(caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="prunekit.moe"):
        report = _prune(zoo.build("qwen2_moe"), expert_min_tokens=10_000)
    counts = report.experts["routed_tokens"]
    assert set(counts) == {f"model.layers.{i}.mlp.experts" for i in range(3)} and all(
        len(c) == 4 for c in counts.values()
    )
    assert len(report.experts["few_tokens"]) == 12 and "expert_tokens='all'" in caplog.text
    assert _prune(zoo.build("qwen2_moe")).experts["few_tokens"] == []  # 16 by default, ~64 tokens each here
    assert report.to_dict()["experts"]["routed_tokens"] == counts
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "prune_report.json").write_text(json.dumps(report.to_dict()))
    markdown = build_report([tmp_path / "run"], tmp_path / "out")["markdown"].read_text()
    assert "calibrated on few tokens" in markdown and "| model.layers.2.mlp.experts | 3 |" in markdown


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_prunes_experts(method):
    model = zoo.build("mixtral")
    _prune(model, method, include=["*.experts.*"])
    for key, w in _expert_matrices(model).items():
        assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.02), (method, key)


@pytest.mark.parametrize(
    "settings",
    [
        dict(update=["dsnot"]),
        dict(method="sparsegpt", update=["admm"]),
        dict(allocation="owl"),
        dict(group="global"),
        dict(
            allocation="explicit",
            allocation_params={"sparsities": {"*.experts.down_proj.*": 0.7, "*": 0.5}, "normalize": True},
        ),
    ],
)
def test_updates_allocations_and_groups_reach_experts(settings):
    model = zoo.build("deepseek_v3")
    report = _prune(model, **{"method": "wanda", **settings})
    rows = report.layers.values()
    assert sum(r["target"] * r["numel"] for r in rows) / sum(r["numel"] for r in rows) == pytest.approx(0.5)
    # per-output rounding: an expert's down projection has 16 inputs, so a row prunes floor(16 x target)
    assert report.sparsity == pytest.approx(0.5, abs=0.04)
    expert_rows = {n: r for n, r in report.layers.items() if ".experts." in n}
    assert expert_rows and all(r["zeros"] > 0 for r in expert_rows.values())
    if settings.get("group") != "global":  # one threshold for all: layers end where their scores put them
        assert all(abs(r["sparsity"] - r["target"]) < 1 / 16 for r in expert_rows.values())
    if settings.get("allocation") == "explicit":
        down = [r["sparsity"] for n, r in expert_rows.items() if ".down_proj." in n]
        up = [r["sparsity"] for n, r in expert_rows.items() if ".gate_up_proj." in n]
        assert min(down) > max(up)


def test_expert_tokens_is_checked_and_reaches_cli_and_recipes():
    from prunekit.cli import build_parser, setting_values
    from prunekit.config import PruneConfig
    from prunekit.recipe import PruneRecipe, recipe_keys

    with pytest.raises(PrunekitError, match="expert_tokens"):
        PruneConfig(expert_tokens="some")
    with pytest.raises(PrunekitError, match="expert-tokens"):
        PruneConfig(method="experts", expert_tokens="all")
    assert {"expert_tokens", "expert_min_tokens"} <= recipe_keys(PruneRecipe)
    args = build_parser().parse_args(["prune", "--expert-tokens", "all", "--expert-min-tokens", "64"])
    assert setting_values(args, PruneRecipe) == {"expert_tokens": "all", "expert_min_tokens": 64}


def test_an_expert_no_token_reaches_is_reported_and_all_tokens_calibrate_it(caplog):
    """SparseGPT on an expert without tokens sees only dead inputs and zeroes it; ``expert_tokens="all"`` avoids
    that, and the report says which expert it was."""
    results = {}
    for tokens in ("routed", "all"):
        model = zoo.build("gpt_oss")
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.router.bias[3] = -1e4  # the router never picks expert 3
        with caplog.at_level(logging.WARNING, logger="prunekit.moe"):
            report = _prune(model, "sparsegpt", include=["*.experts.*"], expert_tokens=tokens)
        results[tokens] = (report, (model.model.layers[1].mlp.experts.down_proj[3] == 0).float().mean().item())
    routed, every = results["routed"], results["all"]
    assert {(r["expert"], r["tokens"]) for r in routed[0].experts["few_tokens"]} == {(3, 0)}
    assert "got no token at all" in caplog.text
    assert routed[1] == 1.0 and every[1] == pytest.approx(0.5, abs=0.02)
    assert (
        every[0].experts["few_tokens"] == [] and every[0].experts["routed_tokens"]["model.layers.1.mlp.experts"][3] == 0
    )
