"""Image calibration: a seeded sample of an ImageFolder, preprocessed with the model's timm data config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

import prunekit
from prunekit.data.images import (
    collate_labeled,
    data_config,
    image_calibration,
    image_dataset,
    image_transform,
    sample_indices,
)
from prunekit.errors import PrunekitError
from tests.conftest import fixture_path
from tests.test_vision_prune import tiny_convnext


@pytest.fixture
def folder(tmp_path):
    """3 classes x 5 random RGB images of 20x20 px (the model's transform resizes them to 32x32)."""
    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / f"class{c}").mkdir()
        for i in range(5):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / f"class{c}" / f"{i}.png")
    return tmp_path


def test_sample_is_the_seeded_randperm_prefix():
    idx = sample_indices(20, 6, seed=3)
    assert torch.equal(idx, torch.randperm(20, generator=torch.Generator().manual_seed(3))[:6])
    assert len(set(idx.tolist())) == 6
    assert not torch.equal(idx, sample_indices(20, 6, seed=4))


def test_calibration_batches_are_the_sampled_images_preprocessed(folder):
    model = tiny_convnext()
    batches = image_calibration(model, folder, nsamples=7, batch_size=3, seed=0)
    assert [b.shape for b in batches] == [(3, 3, 32, 32), (3, 3, 32, 32), (1, 3, 32, 32)]
    dataset = image_dataset(folder, image_transform(data_config(model)))
    expected = torch.stack([dataset[i][0] for i in sample_indices(len(dataset), 7, 0).tolist()])
    assert torch.equal(torch.cat(batches), expected)
    assert torch.equal(torch.cat(image_calibration(model, folder, 7, 4, seed=0)), expected)


def test_calibration_from_a_dataset_of_tensors_and_of_pil_images(folder):
    model = tiny_convnext()
    tensors = TensorDataset(torch.arange(10.0).view(10, 1, 1, 1).expand(10, 3, 32, 32), torch.zeros(10))
    batches = image_calibration(model, tensors, nsamples=4, batch_size=4, seed=0)
    assert batches[0][:, 0, 0, 0].tolist() == sample_indices(10, 4, 0).float().tolist()
    raw = image_dataset(folder)  # no transform: PIL images, preprocessed by the model's transform
    assert image_calibration(model, raw, nsamples=2, batch_size=2)[0].shape == (2, 3, 32, 32)


def test_batches_feed_the_pruning_engine(folder):
    model = tiny_convnext()
    report = prunekit.prune(model, "wanda", 0.5, group="per-layer", calib=image_calibration(model, folder, 6, 3))
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)


def test_errors_name_the_fix(folder):
    model = tiny_convnext()
    with pytest.raises(ValueError, match="lower --nsamples"):
        image_calibration(model, folder, nsamples=16)
    with pytest.raises(PrunekitError, match="ImageFolder"):
        image_calibration(model, folder / "missing", nsamples=2)
    (folder / "empty").mkdir()
    with pytest.raises(PrunekitError, match="empty.*give an ImageFolder tree"):
        image_dataset(folder / "empty")


def _break(folder):
    """One truncated PNG, one JPEG that is not an image at all."""
    good = (folder / "class0" / "0.png").read_bytes()
    (folder / "class0" / "cut.png").write_bytes(good[: len(good) // 2])
    (folder / "class1" / "junk.jpg").write_bytes(b"not an image")
    return {"cut.png", "junk.jpg"}


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_images_fail_naming_the_file(folder, workers):
    model = tiny_convnext()
    _break(folder)
    with pytest.raises(
        PrunekitError,
        match=r"^image '.*(cut.png|junk.jpg)' cannot be read \(.*\); replace or remove "
        r"it, or skip unreadable images \(--skip-bad-images",
    ) as err:
        image_calibration(model, folder, nsamples=17, batch_size=17, num_workers=workers)
    assert "\n" not in str(err.value)  # one line, even when a DataLoader worker raised it


def test_corrupt_images_can_be_skipped_and_counted(folder, caplog):
    import logging

    model = tiny_convnext()
    bad = _break(folder)
    with caplog.at_level(logging.WARNING):
        batches = image_calibration(model, folder, nsamples=17, batch_size=5, skip_bad_images=True)
    assert sum(len(b) for b in batches) == 15
    assert "skipped 2 unreadable image(s) of the 17 sampled" in caplog.text
    assert all(name in caplog.text for name in bad)
    dataset = image_dataset(folder, image_transform(data_config(model)), skip_bad_images=True)
    images, labels = collate_labeled([dataset[i] for i in range(len(dataset))])
    assert images.shape == (15, 3, 32, 32) and labels.shape == (15,)
    assert dataset.classes == ["class0", "class1", "class2"]


def test_digits_calibration_uses_the_fixture_config():
    from prunekit.io.timm import load_vision_model

    model = load_vision_model(f"local-dir:{fixture_path('convnext-digits')}")
    batches = image_calibration(model, fixture_path("digits", "train"), nsamples=8, batch_size=8)
    assert batches[0].shape == (8, 3, 32, 32)
    assert batches[0].min() >= -1 and batches[0].max() <= 1  # mean 0.5 / std 0.5 normalisation


def test_evaluation_skips_unreadable_images_when_asked(folder):
    """--skip-bad-images covers evaluation folders too: by default the first bad image fails naming the file."""
    from prunekit.eval.image import evaluate_image

    model = tiny_convnext(num_classes=3)
    _break(folder)
    with pytest.raises(PrunekitError, match="cannot be read"):
        evaluate_image(model, folder, batch_size=4, progress=False, accelerator="cpu")
    result = evaluate_image(model, folder, batch_size=4, progress=False, accelerator="cpu", skip_bad_images=True)
    assert result["images"] == 15


def test_heldout_images_are_outside_the_calibration_sample_and_cover_every_class():
    from prunekit.data.images import heldout_indices, sample_indices

    targets = [i % 10 for i in range(200)]
    held = heldout_indices(targets, nsamples=64, seed=0, holdout=5)
    assert not set(held) & set(sample_indices(200, 64, 0).tolist())
    assert {targets[i] for i in held} == set(range(10)) and len(held) >= 10 and len(set(held)) == len(held)
    with pytest.raises(PrunekitError, match="fewer than the 150 held out"):
        heldout_indices(targets, nsamples=64, seed=0, holdout=150)
