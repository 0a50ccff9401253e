"""Image classification with Lightning: the same top-1/top-5/loss as a plain loop, whatever the batching."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch.utils.data import TensorDataset

from prunekit.eval.image import ImageClassifier, ImageDataModule, eval_sampler, evaluate_image, run_image_eval_config
from prunekit.io.timm import save_vision_model
from tests.conftest import fixture_path
from tests.test_vision_prune import tiny_convnext

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "imagenet-eval.yaml"


def random_images(n: int = 37, classes: int = 10, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, classes, (n,), generator=gen))


def direct_metrics(model, dataset: TensorDataset) -> dict[str, float]:
    images, labels = dataset.tensors
    with torch.no_grad():
        logits = model(images)
    top5 = logits.topk(5, dim=1).indices
    return {
        "top1": (logits.argmax(1) == labels).float().mean().item(),
        "top5": (top5 == labels[:, None]).any(1).float().mean().item(),
        "loss": F.cross_entropy(logits, labels).item(),
    }


@pytest.mark.parametrize("batch_size", [8, 37])
def test_lightning_eval_equals_a_direct_loop(batch_size):
    model = tiny_convnext()
    data = random_images()
    got = evaluate_image(model, data, batch_size=batch_size, progress=False, accelerator="cpu")
    want = direct_metrics(model, data)
    assert got["images"] == 37 and got["num_classes"] == 10
    assert got["top1"] == pytest.approx(want["top1"], abs=1e-6)
    assert got["top5"] == pytest.approx(want["top5"], abs=1e-6)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_top5_only_with_five_classes_or_more(tmp_path):
    model = tiny_convnext(num_classes=3)
    out = evaluate_image(
        model, random_images(9, classes=3), batch_size=4, progress=False, accelerator="cpu", results=tmp_path / "r.json"
    )
    assert "top5" not in out and 0 <= out["top1"] <= 1
    assert json.loads((tmp_path / "r.json").read_text())["images"] == 9


def _write_folder(root: Path, classes: int, per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"n{c:08d}" / f"{i}.png")
    return root


def test_folder_class_count_must_match_the_model(tmp_path):
    model = tiny_convnext(num_classes=10)
    with pytest.raises(ValueError, match="10 classes but .* 4 class folders"):
        evaluate_image(model, _write_folder(tmp_path / "val", 4), progress=False, accelerator="cpu")


def test_training_step_fits_the_same_module():
    model = tiny_convnext()
    module = ImageClassifier(model, lr=1e-2)
    data = random_images(16)
    dm = ImageDataModule(train=data, val=data, data_config={"input_size": (3, 32, 32)}, batch_size=8)
    before = model.head.fc.weight.detach().clone()
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm)
    assert not torch.equal(model.head.fc.weight, before)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_eval_sampler_covers_every_item_once_across_devices():
    dataset = list(range(11))
    assert eval_sampler(dataset, None) is None
    shards = [list(eval_sampler(dataset, SimpleNamespace(world_size=3, global_rank=r))) for r in range(3)]
    assert sorted(i for s in shards for i in s) == dataset


def _recipe_with(tmp_path: Path, model: str, data: str) -> Path:
    """The shipped recipe with its ImageNet model and data replaced (its trainer section kept)."""
    config = yaml.safe_load(RECIPE.read_text())
    config["model"]["source"], config["data"]["path"] = model, data
    config["data"].update(batch_size=64, num_workers=0)
    config["trainer"]["enable_progress_bar"] = False
    config["results"] = str(tmp_path / "results.json")
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_recipe_runs_on_a_saved_pruned_model(tmp_path):
    model = tiny_convnext(num_classes=3)
    save_vision_model(model, tmp_path / "model")
    folder = _write_folder(tmp_path / "val", 3)
    out = run_image_eval_config(_recipe_with(tmp_path, f"local-dir:{tmp_path / 'model'}", str(folder)))
    assert out["images"] == 6
    assert json.loads((tmp_path / "results.json").read_text())["top1"] == out["top1"]
    again = run_image_eval_config(
        RECIPE,
        {
            "model": {"source": str(tmp_path / "model")},
            "data": {"path": str(folder), "num_workers": 0},
            "trainer": {"enable_progress_bar": False, "accelerator": "cpu"},
            "results": None,
        },
    )
    assert again["top1"] == out["top1"]


def test_recipe_typos_fail_before_work(tmp_path):
    path = tmp_path / "bad.yaml"
    for bad, match in (
        ({"modle": {}}, "unknown section"),
        ({"model": {"source": "x", "sauce": 1}}, "unknown key"),
        ({"trainer": {"max_epoch": 1}, "model": {"source": "x"}}, "unknown key"),
        ({"model": {"source": "x"}}, "needs \\['path'\\]"),
    ):
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match=match):
            run_image_eval_config(path)


@pytest.mark.slow
def test_recipe_on_the_digits_fixture_matches_a_direct_loop(tmp_path):
    """convnext-digits through the shipped recipe = a plain loop over the same preprocessed images."""
    from prunekit.data.images import data_config, image_dataset, image_transform
    from prunekit.io.timm import load_vision_model

    source = f"local-dir:{fixture_path('convnext-digits')}"
    val = fixture_path("digits", "val")
    out = run_image_eval_config(_recipe_with(tmp_path, source, str(val)))
    model = load_vision_model(source)
    dataset = image_dataset(val, image_transform(data_config(model)))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor(dataset.targets)
    assert out["images"] == len(dataset) == 450
    assert out["top1"] == pytest.approx(direct_metrics(model, TensorDataset(images, labels))["top1"], abs=1e-6)
