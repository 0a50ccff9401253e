"""PruneConfig: one config for every front end, validated once before any model is loaded."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import prunekit
from prunekit.config import PruneConfig, per_update_params
from prunekit.errors import PrunekitError
from prunekit.recipe import PruneRecipe, load_recipe, recipe_dict
from tests.conftest import tiny_llama


def test_defaults_and_of():
    config = PruneConfig()
    assert (config.method, config.sparsity, config.update, config.layer_types) == ("wanda", 0.5, (), ("linear",))
    assert PruneConfig.of("magnitude", sparsity=0.7).method == "magnitude"
    assert PruneConfig.of(config, sparsity=None) is config  # None = not given
    assert PruneConfig.of(config, pattern="2:4").pattern == "2:4"
    with pytest.raises(PrunekitError, match="unknown prune setting"):
        PruneConfig.of(spasity=0.5)


def test_lists_and_strings_become_tuples():
    config = PruneConfig(update="admm", include=["model.*"], layer_types=["linear", "conv"])
    assert config.update == ("admm",) and config.include == ("model.*",) and config.layer_types == ("linear", "conv")


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"pattern": "4:2"}, "0 < N < M"),
        ({"group": "per-row"}, "unknown comparison group"),
        ({"allocation": "owl", "allocation_params": {"lam": 2}}, "lam"),
        ({"layer_types": ["dense"]}, "layer type"),
        ({"nsamples": 0}, "nsamples"),
        ({"seqlen": 0}, "seqlen"),
        ({"batch_size": 0}, "batch_size"),
        ({"dtype": "float8"}, "dtype"),
        ({"offload_activations": "gpu"}, "offload_activations"),
        ({"method_params": {"alpha": 1}}, "no parameter"),
        ({"update": "admm", "update_params": {"rho2": 1}}, "no parameter"),
        ({"method": "sparsegpt", "group": "global"}, "global"),
        ({"pattern": "2:4", "allocation": "owl"}, "N:M pattern fixes"),
    ],
)
def test_bad_combinations_fail_at_construction(settings, message):
    with pytest.raises(PrunekitError, match=message):
        PruneConfig(**settings)


def test_cuda_without_a_gpu_is_refused_at_once():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(PrunekitError, match="no CUDA GPU"):
        PruneConfig(device="cuda")
    with pytest.raises(PrunekitError, match="unknown device"):
        PruneConfig(device="gpu0")


# ---------------------------------------------------------------- defects of the copies (issue 16)


def test_flat_update_params_with_two_updates_is_an_error_not_dropped():
    """Defect 2: ``--update admm --update dsnot --update-param iterations=3`` silently ran 20 iterations."""
    with pytest.raises(PrunekitError, match="name the update"):
        PruneConfig(update=["admm", "dsnot"], update_params={"iterations": 3})
    config = PruneConfig(update=["admm", "dsnot"], update_params={"admm.iterations": 3})
    assert config.update_params == {"admm": {"iterations": 3}}
    assert per_update_params(("admm",), {"iterations": 3}) == {"admm": {"iterations": 3}}
    plan = prunekit.plan_prune(tiny_llama(), config)
    assert [u.name for u in plan.updates] == ["admm", "dsnot"] and plan.updates[0].iterations == 3


def test_global_group_with_a_per_layer_allocation_is_an_error():
    """Defect 3: global + explicit {layers.0: 0.2, rest: 0.8} gave 0.2 overall while reporting 0.2/0.8."""
    with pytest.raises(PrunekitError, match="global"):
        PruneConfig(
            method="magnitude",
            group="global",
            allocation="explicit",
            allocation_params={"sparsities": {"model.layers.0.*": 0.2, "*": 0.8}, "normalize": True},
        )


@pytest.mark.parametrize(
    "setting",
    [
        {"pattern": "2:4"},
        {"group": "per-layer"},
        {"update": "admm"},
        {"include": ["model.*"]},
        {"layer_types": ["all"]},
        {"allocation": "owl"},
        {"recalibrate_bn": True},
        {"sequential": False},
    ],
)
def test_structured_methods_refuse_settings_they_would_ignore(setting):
    """Defect 4: depth/width/slicegpt silently ignored pattern, group, update, selection, allocation, BN."""
    with pytest.raises(PrunekitError, match="does not use"):
        PruneConfig(method="depth", **setting)


def test_structured_methods_score_in_eval_mode(token_batch):
    """Defect 4: blocks were scored in training mode (dropout on); prune() now runs them in eval mode."""
    model = tiny_llama(layers=4)
    model.config.attention_dropout = 0.0
    modes = []
    model.model.layers[0].register_forward_pre_hook(lambda m, a: modes.append(m.training))
    model.train()
    prunekit.prune(model, "depth", 0.25, calib=[token_batch])
    assert modes and not any(modes) and model.training  # eval during scoring, restored after


def test_registered_group_is_accepted_by_prune():
    """Defect 6: a group added with register_group was rejected (a second hard-coded list of names)."""
    name = "per-output-copy-for-test"
    if name not in prunekit.GROUPS:
        prunekit.register_group(name)(lambda scores, sparsity: prunekit.GROUPS["per-output"](scores, sparsity))
    model = tiny_llama()
    report = prunekit.prune(model, "magnitude", 0.5, group=name)
    assert report.settings["group"] == name and report.sparsity == pytest.approx(0.5)


def test_unknown_method_lists_structured_methods_too():
    """Defect 11: the error omitted depth/width/slicegpt."""
    with pytest.raises(PrunekitError) as err:
        PruneConfig(method="wandaa")
    assert all(name in str(err.value) for name in ("wanda", "sparsegpt", "depth", "width", "slicegpt"))


# ---------------------------------------------------------------- recipes are configs


def test_recipe_is_a_config_and_round_trips(tmp_path):
    recipe = PruneRecipe(
        model="m",
        method="wanda",
        update=["admm"],
        update_params={"iterations": 3},
        include=["a.*"],
        trust_remote_code=True,
    )
    assert isinstance(recipe, PruneConfig) and recipe.as_config() == PruneConfig(
        method="wanda", update=("admm",), update_params={"admm": {"iterations": 3}}, include=("a.*",)
    )
    data = recipe_dict(recipe)
    assert "trust_remote_code" not in data  # never saved: remote code is enabled on the command line only
    path = tmp_path / "r.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data))
    assert load_recipe(PruneRecipe, path, {}) == dataclasses.replace(recipe, trust_remote_code=False)


def test_recipe_cannot_enable_remote_code(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: m\ntrust_remote_code: true\n")
    with pytest.raises(PrunekitError, match="only the command line"):
        load_recipe(PruneRecipe, path, {})
    assert load_recipe(PruneRecipe, None, {"model": "m", "trust_remote_code": True}).trust_remote_code


@pytest.mark.parametrize(
    "text, message",
    [
        ("- a\n- b\n", "mapping"),
        ("model: [\n", "not valid YAML"),
        ("model: !!python/name:os.system\n", "tag"),
        ("modle: m\n", "unknown key"),
    ],
)
def test_bad_recipe_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(PrunekitError, match=message):
        load_recipe(PruneRecipe, path, {})


def test_lazy_recipe_checks_need_no_model():
    with pytest.raises(PrunekitError, match="--lazy needs"):
        PruneRecipe(model="m", lazy=True, allocation="owl", out="o")
    with pytest.raises(PrunekitError, match="no model"):
        PruneRecipe()


def test_a_new_setting_is_one_field():
    """The CLI flags and recipe keys come from the fields: every PruneConfig field is a prune flag."""
    from prunekit.cli import build_parser

    parser = build_parser()
    prune = parser._subparsers._group_actions[0].choices["prune"]
    dests = {a.dest for a in prune._actions}
    assert {f.name for f in dataclasses.fields(PruneRecipe)} <= dests


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(seed="abc"), "seed must be an integer"),
        (dict(sequential="false"), "sequential must be true or false"),
        (dict(recalibrate_bn="false"), "recalibrate_bn must be true or false"),
        (dict(nsamples=2.5), "nsamples must be an integer"),
        (dict(include="q_proj"), None),  # one pattern is a one-element tuple
        (dict(method="sparsegpt", method_params={"blocksize": 0}), "blocksize"),
        (dict(method="sparsegpt", method_params={"blocksize": "abc"}), "blocksize must be an integer"),
        (dict(update="admm", update_params={"iterations": -3}), "iterations"),
        (dict(update="dsnot", update_params={"max_cycles": "x"}), "max_cycles must be an integer"),
    ],
)
def test_every_value_is_checked_against_its_type_when_the_config_is_made(settings, message):
    """Issue 28 items 2 and 5: a string "false" was truthy (BatchNorm was recalibrated), and parameter values
    failed only after the model load and the dense evaluation."""
    if message is None:
        assert PruneConfig(**settings).include == ("q_proj",)
        return
    with pytest.raises(PrunekitError, match=message):
        PruneConfig(**settings)
