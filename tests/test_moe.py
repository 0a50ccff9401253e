"""Mixture of experts: fused expert tensors are pruned per expert on the tokens routed to it; whole experts can
be removed. Every model is a tiny zoo model built from transformers' own modeling code."""

import ast
import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from prunekit import prune
from prunekit.architectures import EXPERTS_LAYOUTS
from prunekit.collect import collect
from prunekit.coverage import NOT_SELECTED
from prunekit.errors import PrunekitError
from prunekit.graph import find_blocks, find_layers, select_layers, set_weight_matrix, weight_matrix
from prunekit.io.compact import is_2_4
from prunekit.methods import METHODS
from prunekit.moe import (
    EXPERT_COUNT_ATTRIBUTES,
    ExpertWeight,
    _decorated,
    calibrated_on,
    find_experts,
    unknown_experts,
)
from prunekit.report import build_report
from prunekit.structured.experts import EXPERT_COUNT_KEYS
from tests import zoo
from tests.conftest import tiny_llama

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3", "llama4", "jetmoe")
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
    """Llama 4 (issue 28 item 3b): before its experts layout was known, the blocks ended 14-17% sparse while
    ``report.sparsity`` said 0.500."""
    model = zoo.build(name)
    report = _prune(model)
    dense = set(report.experts["dense_gates"])
    assert dense and all(n.endswith(("gate", "router", "router.layer")) for n in dense)  # the routers, nothing else
    assert _block_weight_sparsity(model, dense) >= 0.49
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    experts = {n for n, m in select_layers(model).items() if isinstance(m, ExpertWeight)}
    assert experts and experts <= set(report.layers)
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


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "deepseek_v3", "qwen2_moe", "llama4"])
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


# ---------------------------------------------------------------- every experts layout transformers ships


_TENSOR_FACTORIES = ("empty", "zeros", "ones", "randn", "rand")


def _parameter_dims(node: ast.Call) -> int | None:
    """Dimensions of ``nn.Parameter(torch.empty(a, b, c))`` (or of a tuple argument), None if not such a call."""
    if not ast.unparse(node.func).endswith("Parameter") or not node.args:
        return None
    inner = node.args[0]
    if not isinstance(inner, ast.Call) or ast.unparse(inner.func).rpartition(".")[2] not in _TENSOR_FACTORIES:
        return None
    args = inner.args
    return len(args[0].elts) if len(args) == 1 and isinstance(args[0], (ast.Tuple, ast.List)) else len(args)


@dataclass
class _Source:
    """What a modeling file's class creates in ``__init__``: parameters (name -> dims) and child modules
    (attribute -> class name)."""

    name: str
    decorator: dict[str, bool] | None
    params: dict[str, int]
    children: dict[str, str]
    counted: bool


def _class_source(node: ast.ClassDef) -> _Source:
    decorator = None
    for d in node.decorator_list:
        if "use_experts_implementation" in ast.unparse(d):
            keywords = d.keywords if isinstance(d, ast.Call) else []
            decorator = {k.arg: ast.literal_eval(k.value) for k in keywords}
    params, children, counted = {}, {}, False
    for sub in ast.walk(node):
        if not (isinstance(sub, ast.Assign) and len(sub.targets) == 1):
            continue
        target = ast.unparse(sub.targets[0]).removeprefix("self.")
        counted |= target in EXPERT_COUNT_ATTRIBUTES
        if isinstance(sub.value, ast.Call):
            dims = _parameter_dims(sub.value)
            if dims is not None:
                params[target] = dims
            elif isinstance(sub.value.func, ast.Name):
                children[target] = sub.value.func.id
    return _Source(node.name, decorator, params, children, counted)


def _holds_expert_weights(cls: _Source) -> bool:
    """The source twin of ``moe.holds_expert_weights``: parameters of 2+ dims in a class named *Expert*, of 3+
    dims next to an expert count, or the decorator."""
    named = "expert" in cls.name.lower()
    return cls.decorator is not None or any(named or (cls.counted and d >= 3) for d in cls.params.values())


def _transformers_classes() -> dict[str, _Source]:
    """Every class of transformers' modeling files that mention experts, by ``<family>.<class>``, read from source
    (no model is built)."""
    root = Path(transformers.__file__).parent / "models"
    found = {}
    for path in sorted(root.glob("*/modeling_*.py")):
        text = path.read_text()
        if "xpert" in text:
            for node in ast.parse(text).body:
                if isinstance(node, ast.ClassDef):
                    found[f"{path.parent.name}.{node.name}"] = _class_source(node)
    return found


DECORATOR_DEFAULTS = dict(has_gate=True, is_transposed=False, has_bias=False, has_post_expert_norm=False)


def _declared_dims(source: _Source, path: str, by_name: dict[str, _Source]) -> int | None:
    """Dimensions of the parameter at ``path`` (``mlp.w1``: through the child ``mlp``'s class) as created."""
    head, _, rest = path.partition(".")
    if not rest:
        return source.params.get(head)
    child = by_name.get(source.children.get(head, ""))
    return None if child is None else _declared_dims(child, rest, by_name)


def test_every_experts_class_transformers_ships_is_decorated_or_has_a_layout():
    """Issue 28 item 3b: Llama 4's experts (no decorator, its own calling convention) were walked past, and
    Wanda 50% left its blocks 14% sparse. Every class that holds expert weights is now decorated (its attributes
    give the layout), listed in ``EXPERTS_LAYOUTS``, or the child that holds a listed class's weights."""
    every = _transformers_classes()
    classes = {name: source for name, source in every.items() if _holds_expert_weights(source)}
    assert len(classes) > 50 and "llama4.Llama4TextExperts" in classes and "jetmoe.JetMoeParallelExperts" in classes
    by_name = {source.name: source for source in every.values()}
    holders = {  # DBRX: DbrxExperts calls, its child ``mlp`` (DbrxExpertGLU) holds the weights
        by_name[name].children[path.split(".")[0]]: name
        for name, layout in EXPERTS_LAYOUTS.items()
        for path in layout.params
        if "." in path
    }
    unknown = []
    for qualified, source in classes.items():
        if source.decorator is not None:
            flags = {**DECORATOR_DEFAULTS, **source.decorator}
            layout, dims = _decorated(*(bool(flags[k]) for k in DECORATOR_DEFAULTS)), 3
        elif source.name in EXPERTS_LAYOUTS:
            layout = EXPERTS_LAYOUTS[source.name]
            dims = 2 if layout.count else 3
        else:
            layout, dims = None, None
        fits = layout is not None and all(_declared_dims(source, p, by_name) == dims for p in layout.params)
        if not fits and source.name not in holders:
            unknown.append(qualified)
    assert unknown == []
    assert set(EXPERTS_LAYOUTS) <= set(by_name)  # no entry for a class transformers no longer ships


# ---------------------------------------------------------------- layouts without the decorator, against plain Linears

# Tiny models of the families whose experts transformers ships without ``@use_experts_implementation``, beyond the
# zoo's llama4 and jetmoe (Step 3.7 has no causal-LM class: its text model; Inkling also has a decorated routed half).
_TINY = dict(vocab_size=zoo.VOCAB, hidden_size=32, max_position_embeddings=128, bos_token_id=0, eos_token_id=1)
_LAYOUT_MODELS = {
    "step3p7": (
        "Step3p7TextConfig",
        "Step3p7TextModel",
        dict(
            _TINY,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=64,
            num_local_experts=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            share_expert_dim=32,
            sliding_window=8,
            mlp_layer_types=["sparse", "sparse"],
        ),
    ),
    "longcat_flash": (
        "LongcatFlashConfig",
        "LongcatFlashForCausalLM",
        dict(
            _TINY,
            num_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            ffn_hidden_size=64,
            expert_ffn_hidden_size=16,
            n_routed_experts=4,
            zero_expert_num=2,
            moe_topk=2,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
            head_dim=8,
        ),
    ),
    "dbrx": (
        "DbrxConfig",
        "DbrxForCausalLM",
        dict(
            vocab_size=zoo.VOCAB,
            d_model=32,
            n_heads=4,
            n_layers=2,
            max_seq_len=128,
            attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
            ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2),
        ),
    ),
    "inkling": (
        "InklingTextConfig",
        "InklingForCausalLM",
        dict(
            _TINY,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            swa_num_attention_heads=4,
            swa_num_key_value_heads=2,
            swa_head_dim=8,
            sliding_window_size=8,
            rel_extent=16,
            intermediate_size=64,
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=2,
        ),
    ),
}


def _layout_model(name: str) -> nn.Module:
    if name in zoo.ZOO:
        return zoo.build(name)
    config, model, settings = _LAYOUT_MODELS[name]
    torch.manual_seed(0)
    return getattr(transformers, model)(getattr(transformers, config)(**settings)).float().eval()


def _inputs_of(model: nn.Module, kinds: tuple[type, ...]) -> dict[str, torch.Tensor]:
    """What every module of one of ``kinds`` receives in the dense model, batch by batch as prune() feeds them."""
    seen: dict[str, list[torch.Tensor]] = {}
    modules = {n: m for n, m in model.named_modules() if isinstance(m, kinds)}

    def record(name):
        return lambda m, args, kwargs: seen.setdefault(name, []).append(
            (args[0] if args else kwargs["hidden_states"]).reshape(-1, model.config.hidden_size)
        )

    handles = [m.register_forward_pre_hook(record(n), with_kwargs=True) for n, m in modules.items()]
    with torch.no_grad():
        for ids in _ids().split(CALIB["batch_size"]):
            model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return {n: torch.cat(x) for n, x in seen.items()}


# Each family's experts as plain matrices, written from transformers' modeling code (not from prunekit's table):
# {(module, parameter, expert): (input rows, [out, in] matrix read from the model)}.
Matrices = dict[tuple[str, str, int], tuple[torch.Tensor, Callable[[nn.Module], torch.Tensor]]]


def _glu(up: torch.Tensor) -> torch.Tensor:
    gate, lin = up.chunk(2, dim=-1)
    return F.silu(gate) * lin


def _reader(path: str, param: str, e: int, stacked: int = 0, transposed: bool = False):
    """Reads expert ``e``'s ``[out, in]`` matrix of ``path.param`` from a model: ``param[e]``, or the ``e``-th of
    ``stacked`` row blocks of a 2-D parameter, transposed back when stored ``[in, out]``."""

    def read(model: nn.Module) -> torch.Tensor:
        w = model.get_submodule(path).get_parameter(param)
        w = w.view(stacked, -1, w.shape[-1])[e] if stacked else w[e]
        return w.t() if transposed else w

    return read


def _llama4(model) -> Matrices:
    """Tokens reach an expert repeated and scaled by its sigmoid router score; stored [in, out]."""
    out: Matrices = {}
    for block, h in _inputs_of(model, (transformers.models.llama4.modeling_llama4.Llama4TextMoe,)).items():
        path = f"{block}.experts"
        scores, _ = model.get_submodule(block).router(h)
        for e in range(scores.shape[1]):
            routed = scores[:, e] > 0
            x = h[routed] * scores[routed, e : e + 1]
            up = _reader(path, "gate_up_proj", e, transposed=True)
            out[(path, "gate_up_proj", e)] = (x, up)
            out[(path, "down_proj", e)] = (_glu(x @ up(model).t()), _reader(path, "down_proj", e, transposed=True))
    return out


def _routed_glu(model, kind: type, route: Callable) -> Matrices:
    """Experts that take the tokens whose top-k index names them; stored [out, in], gate then up halves."""
    out: Matrices = {}
    for block, h in _inputs_of(model, (kind,)).items():
        index, path = route(model.get_submodule(block), h), f"{block}.experts"
        for e in range(model.get_submodule(path).down_proj.shape[0]):
            x, up = h[(index == e).any(dim=-1)], _reader(path, "gate_up_proj", e)
            out[(path, "gate_up_proj", e)] = (x, up)
            out[(path, "down_proj", e)] = (_glu(x @ up(model).t()), _reader(path, "down_proj", e))
    return out


def _step3p7(model) -> Matrices:
    kind = transformers.models.step3p7.modeling_step3p7.Step3p7SparseMoeBlock
    return _routed_glu(model, kind, lambda moe, h: moe.gate(h)[2])


def _longcat(model) -> Matrices:
    kind = transformers.models.longcat_flash.modeling_longcat_flash.LongcatFlashMoE
    return _routed_glu(model, kind, lambda moe, h: moe.router(h)[2])


def _dbrx(model) -> Matrices:
    """Stacked 2-D [experts * ffn, hidden] on the child mlp: w1 (gate) and v1 (up) [out, in], w2 [in, out]."""
    out: Matrices = {}
    for block, h in _inputs_of(model, (transformers.models.dbrx.modeling_dbrx.DbrxFFN,)).items():
        ffn, path = model.get_submodule(block), f"{block}.experts"
        _, index = ffn.route_tokens_to_experts(ffn.router(h))
        count = ffn.experts.num_experts
        for e in range(count):
            x = h[(index == e).any(dim=-1)]
            w1, v1 = _reader(f"{path}.mlp", "w1", e, count), _reader(f"{path}.mlp", "v1", e, count)
            out[(path, "mlp.w1", e)], out[(path, "mlp.v1", e)] = (x, w1), (x, v1)
            hidden = F.silu(x @ w1(model).t()) * (x @ v1(model).t())
            out[(path, "mlp.w2", e)] = (hidden, _reader(f"{path}.mlp", "w2", e, count, transposed=True))
    return out


def _jetmoe(model) -> Matrices:
    """One fused matrix per module, its rows sorted by expert; the MLP's and the attention experts' input_linear
    take the routed tokens, the MLP's output_linear their GLU, the attention's output_linear the attention output
    of each (token, expert) pair, captured from the model's own reduce step."""
    modeling = transformers.models.jetmoe.modeling_jetmoe
    reduced: dict[str, list[tuple[torch.Tensor, ...]]] = {}
    for name, moa in model.named_modules():
        if isinstance(moa, modeling.JetMoeMoA):

            def capture(layer_input, topo_info, name=name, original=moa.reduce):
                rows = layer_input.reshape(-1, layer_input.shape[-1])[topo_info[0]]
                reduced.setdefault(name, []).append(rows.split(topo_info[3]))
                return original(layer_input, topo_info)

            moa.reduce = capture
    inputs = _inputs_of(model, (modeling.JetMoeMoE, modeling.JetMoeAttention))
    for name in reduced:
        del model.get_submodule(name).reduce
    out: Matrices = {}
    for block, h in inputs.items():
        moe = model.get_submodule(block)
        path = block if isinstance(moe, modeling.JetMoeMoE) else f"{block}.experts"
        _, batch_index, _, sizes, _ = model.get_submodule(path).router(h)
        for e, x in enumerate(h[batch_index].split(sizes)):
            up = _reader(f"{path}.input_linear", "weight", e)
            out[(f"{path}.input_linear", "weight", e)] = (x, up)
            hidden = _glu(x @ up(model).t()) if path == block else torch.cat([r[e] for r in reduced[path]])
            out[(f"{path}.output_linear", "weight", e)] = (hidden, _reader(f"{path}.output_linear", "weight", e))
    return out


def _inkling(model) -> Matrices:
    """Shared experts: every token, the activated up projection scaled by the router's per-token gamma."""
    out: Matrices = {}
    for block, h in _inputs_of(model, (transformers.models.inkling.modeling_inkling.InklingMoE,)).items():
        moe, path = model.get_submodule(block), f"{block}.shared_experts"
        gammas = moe.gate(h)[3]
        for e in range(moe.shared_experts.down_proj.shape[0]):
            gate, up = _reader(path, "gate_proj", e), _reader(path, "up_proj", e)
            out[(path, "gate_proj", e)], out[(path, "up_proj", e)] = (h, gate), (h, up)
            hidden = F.silu(h @ gate(model).t()) * (h @ up(model).t()) * gammas[:, e : e + 1]
            out[(path, "down_proj", e)] = (hidden, _reader(path, "down_proj", e))
    return out


_REFERENCES = {
    "llama4": _llama4,
    "jetmoe": _jetmoe,
    "step3p7": _step3p7,
    "longcat_flash": _longcat,
    "dbrx": _dbrx,
    "inkling": _inkling,
}


def _outputs(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=zoo.token_ids(2, 16, seed=7), use_cache=False)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize("name", list(_REFERENCES))
def test_experts_of_every_layout_get_wanda_masks_of_plain_linears_and_reload(name, tmp_path):
    """Each family's experts, run as plain matrices on the rows transformers' own code sends them, give the
    masks prunekit gives the fused tensors (per-output Wanda, 50%), and the pruned model reloads."""
    model = _layout_model(name)
    matrices = _REFERENCES[name](model)
    expected = {key: _keep_top_half(read(model).abs() * x.norm(dim=0)) for key, (x, read) in matrices.items()}
    report = _prune(model, sequential=False)  # every block calibrated on the dense model
    assert {f"{module}.{param}.{e}" for module, param, e in expected} <= set(report.layers)
    for key, mask in expected.items():
        assert torch.equal(matrices[key][1](model) != 0, mask), key
    model.save_pretrained(tmp_path)
    assert torch.equal(_outputs(model), _outputs(type(model).from_pretrained(tmp_path).float().eval()))


# ---------------------------------------------------------------- a layout prunekit does not know


class _TinyExperts(nn.Module):
    """Fused experts in a layout no table describes: prunekit cannot tell which rows each expert sees."""

    def __init__(self):
        super().__init__()
        self.w_in, self.w_out = nn.Parameter(torch.randn(4, 8, 16)), nn.Parameter(torch.randn(4, 16, 8))

    def forward(self, x):
        return torch.einsum("btd,edh,ehk->btk", x, self.w_in, self.w_out) / 4


class _Stacked(nn.Module):
    """A 3-D weight next to an expert count, in a class not named after experts."""

    def __init__(self):
        super().__init__()
        self.num_experts = 4
        self.weight = nn.Parameter(torch.randn(4, 8, 8))

    def forward(self, x):
        return torch.einsum("btd,ekd->btk", x, self.weight) / 4


class _Block(nn.Module):
    def __init__(self, moe: type):
        super().__init__()
        self.attn, self.moe = nn.Linear(8, 8), moe()

    def forward(self, x):
        return x + self.moe(self.attn(x))


class _Model(nn.Module):
    def __init__(self, moe: type):
        super().__init__()
        self.layers = nn.ModuleList(_Block(moe) for _ in range(2))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@pytest.mark.parametrize("moe", [_TinyExperts, _Stacked])
def test_fused_experts_of_an_unknown_layout_are_refused_in_one_line(moe):
    model, calib = _Model(moe), [torch.randn(2, 6, 8) for _ in range(2)]
    with pytest.raises(PrunekitError, match=rf"layers\.0\.moe \({moe.__name__}\) holds fused expert weights") as err:
        prune(model, "wanda", 0.5, calib=calib)
    message = str(err.value)
    assert "\n" not in message and "--exclude 'layers.*.moe.*'" in message and "EXPERTS_LAYOUTS" in message
    with pytest.raises(PrunekitError, match="holds fused expert weights"):
        prune(model, "wanda", 0.5, calib=calib, include=["*.moe.*"])
    report = prune(model, "wanda", 0.5, calib=calib, exclude=["layers.*.moe.*"])  # the rest prunes, on request
    assert set(report.layers) == {"layers.0.attn", "layers.1.attn"}
    left = {item["name"]: item["reason"] for item in report.coverage["left_dense"]}
    assert set(left) == {f"layers.{i}.moe.{p}" for i in range(2) for p, _ in moe().named_parameters()}
    assert set(left.values()) == {NOT_SELECTED} and "warning" not in report.coverage
    assert prune(_Model(moe), "wanda", 0.5, calib=calib, include=["*.attn"]).sparsity == pytest.approx(0.5)


def test_a_decorated_module_whose_weights_do_not_fit_its_flags_is_refused():
    experts = _TinyExperts()
    experts.has_gate, experts.is_transposed, experts.has_bias = True, False, False  # but no gate_up_proj
    model = _Model(_TinyExperts)
    model.layers[1].moe = experts
    with pytest.raises(PrunekitError, match=r"layers\.0\.moe \(_TinyExperts\)"):
        select_layers(model)
    assert find_experts(model) == {} and set(unknown_experts(model)) == {"layers.0.moe", "layers.1.moe"}


@pytest.mark.parametrize(
    "experts",
    [
        lambda: transformers.models.switch_transformers.modeling_switch_transformers.SwitchTransformersExperts(
            transformers.SwitchTransformersConfig(d_model=8, d_ff=16, num_experts=4)
        ),
        lambda: transformers.models.nllb_moe.modeling_nllb_moe.NllbMoeExperts(
            transformers.NllbMoeConfig(d_model=8, num_experts=4), ffn_dim=16
        ),
    ],
)
def test_experts_held_as_separate_linears_are_ordinary_layers(experts):
    """SwitchTransformers' and NLLB-MoE's experts are a ModuleDict of small MLPs: each matrix is a Linear to the
    walker already, and nothing there looks like fused weights."""
    module = experts()
    layers = find_layers(module)
    assert len(layers) == 8 and all(type(m) is nn.Linear for m in layers.values())
    assert find_experts(module) == {} and unknown_experts(module) == {}
    assert select_layers(module, keep_head=False) == layers


# ---------------------------------------------------------------- calling conventions in the engine's corners


def test_llama4_all_tokens_calibrate_every_expert_on_the_moe_input():
    """Llama 4's experts receive only routed tokens (pre-scaled); ``expert_tokens='all'`` feeds every token of the
    MoE block's input instead, unscaled."""
    model = zoo.build("llama4")
    h = _inputs_of(model, (transformers.models.llama4.modeling_llama4.Llama4TextMoe,))["model.layers.1.feed_forward"]
    layers = calibrated_on(select_layers(model, include=["model.layers.1.feed_forward.experts.gate_up_proj.*"]), "all")
    with collect(layers) as stats, torch.no_grad():
        for ids in _ids().split(CALIB["batch_size"]):
            model(input_ids=ids, use_cache=False)
    for name in layers:
        assert stats[name].ntokens == h.shape[0] and stats[name].nsamples == _ids().shape[0]
        assert torch.allclose(stats[name].sq_sum[0], h.square().sum(dim=0), rtol=1e-5)
    assert sum(v.routed_tokens for v in layers.values()) == h.shape[0]  # top-1: every token counted once


def test_all_tokens_are_refused_for_experts_that_see_only_their_own():
    with pytest.raises(PrunekitError, match=r"expert_tokens='all'.*JetMoeParallelExperts.*receives only"):
        _prune(zoo.build("jetmoe"), expert_tokens="all")


@pytest.mark.parametrize("name", ["dbrx", "longcat_flash", "jetmoe"])
def test_expert_removal_refuses_layouts_it_cannot_shrink_in_one_line(name):
    """DBRX stacks its experts 2-D in a child, LongCat-Flash has rows for its zero-compute experts, JetMoE splits an
    expert over two modules: removing whole experts would leave a model that does not reload."""
    with pytest.raises(PrunekitError, match="stores its experts otherwise") as err:
        _prune(_layout_model(name), "experts", 0.5)
    assert "\n" not in str(err.value)
