"""``prunekit prune --target``, ``prunekit sensitivity`` and ``prunekit allocate`` as users run them: settings checked
when the recipe is made (one line each), the search from Python, and the commands on a saved tiny model."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.masks import count_zeros
from prunekit.quality import no_sparsity_line, search_target
from prunekit.recipe import PruneRecipe, SensitivityRecipe
from tests.conftest import tiny_llama
from tests.test_cli import _prune_args, checkpoint  # noqa: F401  (the module-scoped fixture)
from tests.test_cli_models import CASES, METRIC, models, prune_args  # noqa: F401  (the module-scoped fixture)

# ---------------------------------------------------------------- checked when the recipe is made


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        (dict(target="ppl>=50"), "better lower"),
        (dict(target="ppl<=+10%", pattern="2:4"), "drop --pattern"),
        (dict(target="ppl<=+10%", lazy=True, out="o"), "--lazy needs"),
        (dict(target="ppl<=+10%", allocation="explicit", allocation_params={"sparsities": {"*": 0.5}}), "normalize"),
        (dict(target="ppl<=+10%", calib_data=None), "needs data to measure on"),
        (dict(target_trials=4), "--target-trials"),
        (dict(holdout=16), "--holdout"),
        (dict(target="ppl<=+10%", eval_data="t.txt", holdout=16), "--holdout"),
        (dict(target="ppl<=60", target_trials=0), "target_trials must be a positive integer"),
    ],
)
def test_target_settings_are_checked_when_the_recipe_is_made(settings, says):
    with pytest.raises(PrunekitError, match=says) as err:
        PruneRecipe(**{"model": "m", "calib_data": "c.txt", **settings})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        (dict(sparsity=0.7), "does not use --sparsity"),
        (dict(target="ppl<=60"), "does not use --target"),
        (dict(method="depth"), "structured method"),
        (dict(parts="heads"), "unknown parts"),
        (dict(sparsities="0.5,lots"), "must be numbers"),
        (dict(allocation="owl"), "drop --allocation"),
    ],
)
def test_scan_settings_are_checked_when_the_recipe_is_made(settings, says):
    with pytest.raises(PrunekitError, match=says) as err:
        SensitivityRecipe(**{"model": "m", "calib_data": "c.txt", **settings})
    assert "\n" not in str(err.value)
    assert SensitivityRecipe(model="m", calib_data="c.txt", sparsities="0.3, 0.6", holdout=8).sparsities == (0.3, 0.6)


def test_finetuning_refuses_a_target():
    from prunekit.finetune.recipe import FinetuneRecipe, check_finetune

    with pytest.raises(PrunekitError, match="--target"):
        check_finetune(FinetuneRecipe(model="m", calib_data="c.txt", target="ppl<=60"))


# ---------------------------------------------------------------- the search from Python


def zero_fraction_metric(model) -> dict[str, float]:
    """A metric that is exactly 10 + 100 x the zero fraction of the decoder weights: known everywhere."""
    weights = [m.weight for n, m in model.named_modules() if n.startswith("model.layers.") and hasattr(m, "weight")]
    weights = [w for w in weights if w.dim() == 2]
    zeros = sum(count_zeros(w) for w in weights) / sum(w.numel() for w in weights)
    return {"ppl": 10 + 100 * zeros}


def test_search_target_from_python_leaves_the_model_dense_and_returns_the_best():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = torch.randint(0, 128, (4, 16))
    pruned, report, search = search_target(model, "magnitude", calib, zero_fraction_metric, "ppl<=70")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert search.best.sparsity == pytest.approx(0.6, abs=0.01) and len(search.trials) <= 8
    assert zero_fraction_metric(pruned)["ppl"] <= 70 and report.settings["sparsity"] == search.best.sparsity


def test_a_bound_no_sparsity_meets_ends_with_a_clear_line():
    pruned, report, search = search_target(
        tiny_llama(), "magnitude", None, zero_fraction_metric, "ppl<=10.5", max_trials=12
    )
    assert pruned is None and report is None and min(t.sparsity for t in search.trials) == 0.01
    line = no_sparsity_line(search)
    assert "no sparsity meets --target 'ppl<=10.5'" in line and "0.01" in line and "nothing was saved" in line


def test_a_bound_on_a_metric_the_model_does_not_report_is_refused():
    with pytest.raises(PrunekitError, match="reports ppl"):
        search_target(tiny_llama(), "magnitude", None, zero_fraction_metric, "top1>=0.9")


# ---------------------------------------------------------------- the commands on a saved tiny model


def test_prune_to_a_target_saves_the_best_model_with_the_search(checkpoint, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "target"
    args = _prune_args(checkpoint, out, "--eval-data", str(checkpoint / "test.txt"), "--target", "ppl<=+5%")
    assert main([*args, "--target-trials", "4"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "prune_report.json").read_text())
    search = report["search"]
    assert printed.count("trial ") >= len(search["trials"]) and "highest sparsity that meets it" in printed
    assert len(search["trials"]) <= 4 and search["chosen"] == report["settings"]["sparsity"]
    assert report["metrics"]["ppl"] <= search["threshold"] and "ppl_dense" in report["metrics"]
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["sparsity"] == search["chosen"] and saved["target"] is None  # repeats the model without searching


def test_a_target_the_dense_model_misses_is_one_line_before_pruning(checkpoint, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "never"
    assert main(_prune_args(checkpoint, out, "--target", "ppl<=1", "--holdout", "4")) == 2
    captured = capsys.readouterr()
    assert "dense model already misses --target 'ppl<=1'" in captured.err and "trial" not in captured.out
    message = [line for line in captured.err.strip().splitlines() if "Loading weights" not in line]  # its bar
    assert len(message) == 1 and not out.exists()


def test_scan_then_allocate_then_prune_from_the_command_line(checkpoint, tmp_path, capsys):  # noqa: F811
    scan_dir, recipe = tmp_path / "scan", tmp_path / "alloc.yaml"
    scan_args = ["sensitivity", *_prune_args(checkpoint, scan_dir, "--holdout", "4", "--sparsities", "0.5,0.9")[1:]]
    assert main(scan_args) == 0
    assert "ppl @ 0.9" in capsys.readouterr().out
    scan = json.loads((scan_dir / "sensitivity.json").read_text())
    assert [p["name"] for p in scan["parts"]] == ["model.layers.0", "model.layers.1"]
    assert scan["sparsities"] == [0.5, 0.9]
    assert (scan_dir / "sensitivity.png").read_bytes()[:4] == b"\x89PNG" and (scan_dir / "sensitivity.md").exists()
    assert "held out" in scan["settings"]["measured_on"]
    allocate = ["allocate", "--scan", str(scan_dir / "sensitivity.json"), "--sparsity", "0.6", "--out", str(recipe)]
    assert main(allocate) == 0
    written = yaml.safe_load(recipe.read_text())
    assert written["allocation"] == "explicit" and set(written["allocation_params"]["sparsities"]) == {0, 1}
    assert main(["prune", "--recipe", str(recipe), "--out", str(tmp_path / "pruned")]) == 0
    report = json.loads((tmp_path / "pruned" / "prune_report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.6, abs=0.02)
    assert main(allocate) == 2
    assert "exists" in capsys.readouterr().err


# ---------------------------------------------------------------- every model class


@pytest.mark.parametrize("name", CASES)
def test_scan_and_target_on_every_model_class(models, tmp_path, name):  # noqa: F811
    """Text classes are measured on windows held out of the calibration text (classifiers and encoders against the
    dense model's own outputs), the image-text model on its evaluation records; then a two-trial target search."""
    model_class = CASES[name][0]
    argv = prune_args(models, name, tmp_path / "scan")
    if name != "llava":
        at = argv.index("--eval-data")
        del argv[at : at + 2]
        argv += ["--holdout", "4"]
    assert main(["sensitivity", *argv[1:], "--sparsities", "0.9"]) == 0
    scan = json.loads((tmp_path / "scan" / "sensitivity.json").read_text())
    metric = {"sequence-classification": "agreement"}.get(model_class, METRIC[model_class])
    assert scan["metric"] == metric and len(scan["parts"]) >= 2 and all(len(row) == 1 for row in scan["results"])
    metric = METRIC[model_class]
    bound = f"{metric}>=-1" if metric in ("accuracy", "embedding_cosine") else f"{metric}<=+1000%"
    target = prune_args(models, name, tmp_path / "target", "--target", bound, "--target-trials", "2")
    assert main(target) == 0
    report = json.loads((tmp_path / "target" / "prune_report.json").read_text())
    assert [t["sparsity"] for t in report["search"]["trials"]] == [0.5, 0.74] and report["settings"]["sparsity"] == 0.74


def test_scan_and_target_on_an_image_classifier(tmp_path):
    """A timm ConvNeXt: stages are the parts, held-out images the scan's data, top-1 the target's metric."""
    from prunekit.cli import demo_assets

    assets = demo_assets()
    model = ["--model", f"local-dir:{assets / 'convnext-digits-500k'}"]
    model += ["--calib-data", str(assets / "digits" / "train")]
    data = ["--nsamples", "16", "--batch-size", "16", "--eval-batch-size", "100"]
    scan = ["sensitivity", *model, *data, "--holdout", "40", "--sparsities", "0.5,0.95", "--out", str(tmp_path / "s")]
    assert main(scan) == 0
    result = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert result["metric"] == "top1" and [p["name"] for p in result["parts"]] == [f"stages.{i}" for i in range(4)]
    assert "loss" in result["results"][0][0]  # the allocation reads the smoother cross-entropy
    target = ["prune", *model, *data, "--eval-data", str(assets / "digits" / "val"), "--target", "top1>=-0.02"]
    assert main([*target, "--target-trials", "3", "--out", str(tmp_path / "t")]) == 0
    report = json.loads((tmp_path / "t" / "prune_report.json").read_text())
    assert report["metrics"]["top1"] >= report["metrics"]["top1_dense"] - 0.02 and len(report["search"]["trials"]) == 3


def test_the_recipe_a_target_search_saves_records_what_it_resolved(checkpoint, tmp_path):  # noqa: F811
    """As ``prunekit prune`` saves it: the model class and the windows' length used when ``--seqlen`` was left out
    (the search's recipe recorded ``seqlen: null``)."""
    out = tmp_path / "target"
    args = _prune_args(checkpoint, out, "--eval-data", str(checkpoint / "test.txt"), "--target", "ppl<=+1000%")
    i = args.index("--seqlen")
    assert main([*args[:i], *args[i + 2 :], "--target-trials", "2"]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["model_class"] == "causal-lm" and saved["seqlen"] == report["settings"]["seqlen"] > 0
