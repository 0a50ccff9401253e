"""The CLI on image models, as a user runs it: a timm model + an ImageFolder (offline: local-dir fixtures)."""

import json

import pytest

from prunekit.cli import main
from tests.conftest import fixture_path


@pytest.mark.slow
def test_prune_convnext_digits_per_layer_default_and_reload(tmp_path):
    import timm

    model_dir, digits = fixture_path("convnext-digits"), fixture_path("digits")
    out = tmp_path / "convnext-50"
    assert (
        main(
            [
                "prune",
                "--model",
                f"local-dir:{model_dir}",
                "--method",
                "wanda",
                "--sparsity",
                "0.5",
                "--calib-data",
                str(digits / "train"),
                "--nsamples",
                "64",
                "--batch-size",
                "32",
                "--eval-data",
                str(digits / "val"),
                "--eval-batch-size",
                "150",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "prune_report.json").read_text())
    assert report["settings"]["group"] == "per-layer"  # the vision default
    assert report["settings"]["blocks"] == "stages"
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert "stem.0" not in report["layers"] and "head.fc" not in report["layers"]
    assert report["metrics"]["top1_dense"] == pytest.approx(0.9933, abs=1e-3)  # METRICS.md
    assert report["metrics"]["top1"] > 0.95
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    w = dict(reloaded.named_modules())["stages.1.blocks.0.mlp.fc1"].weight
    assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)


@pytest.mark.slow
def test_resnet_bn_recalibration_is_automatic_and_reported(tmp_path):
    digits = fixture_path("digits")
    out = tmp_path / "resnet"
    assert (
        main(
            [
                "prune",
                "--model",
                "torchvision:resnet18",
                "--method",
                "magnitude",
                "--sparsity",
                "0.5",
                "--include",
                "layer*",
                "--calib-data",
                str(digits / "train"),
                "--nsamples",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )  # 8 images (each a 224 px resnet18 forward): the checks need no more
    report = json.loads((out / "prune_report.json").read_text())
    assert report["bn_recalibration"]["layers"] > 0
    assert (
        main(
            [
                "prune",
                "--model",
                "torchvision:resnet18",
                "--method",
                "magnitude",
                "--include",
                "layer*",
                "--calib-data",
                str(digits / "train"),
                "--nsamples",
                "8",
                "--no-recalibrate-bn",
                "--out",
                str(tmp_path / "r2"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "r2" / "prune_report.json").read_text())["bn_recalibration"] is None
