"""``prunekit finetune`` recipes: validation before any work, and end to end on the fixtures (slow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from prunekit.errors import PrunekitError
from prunekit.finetune import load_finetune_recipe, run_finetune_recipe
from prunekit.finetune.recipe import FinetuneRecipe
from tests.conftest import fixture_path

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, **settings) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "train_data": None, "calib_data": "x.txt", **settings}))
    return path


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(lora_rank=4), "unknown key"),
        (dict(lora={"r": 4, "rank": 8}), "unknown lora key"),
        (dict(lora={"r": 4}, schedule="cubic", end_step=10), "LoRA freezes"),
        (dict(schedule="cubic", end_step=500, max_steps=100), "after max_steps"),
        (dict(schedule="gradual"), "schedule must be"),
        (dict(task="segmentation"), "task must be"),
    ],
)
def test_bad_recipes_fail_before_any_work(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        load_finetune_recipe(write(tmp_path, **settings))


def test_shipped_recipes_parse(monkeypatch):
    """The shipped recipes run on prunekit/assets (paths from the repository root); flags override them."""
    monkeypatch.chdir(ROOT)
    llm = load_finetune_recipe(ROOT / "recipes" / "llama-wanda70-lora.yaml")
    vision = load_finetune_recipe(ROOT / "recipes" / "convnext-gradual.yaml", {"max_steps": 400})
    assert (llm.sparsity, llm.schedule, llm.lora["r"]) == (0.7, "oneshot", 16)
    assert (vision.schedule, vision.end_step, vision.max_steps) == ("cubic", 15, 400)
    assert llm.model.startswith("prunekit/assets/") and vision.train_data.startswith("prunekit/assets/")


def head_text(tmp_path: Path, name: str, chars: int) -> Path:
    path = tmp_path / name
    path.write_text(fixture_path("kjv", name).read_text()[:chars])
    return path


def image_subset(tmp_path: Path, split: str, per_class: int) -> Path:
    """The first ``per_class`` images of every class folder: an ImageFolder small enough for a test."""
    for folder in sorted(fixture_path("digits", split).iterdir()):
        target = tmp_path / split / folder.name
        target.mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            shutil.copy(image, target / image.name)
    return tmp_path / split


@pytest.mark.slow
def test_llm_wanda_lora_recipe_end_to_end(tmp_path):
    model = fixture_path("kjv-llama-5m")
    train, test = head_text(tmp_path, "train.txt", 60000), head_text(tmp_path, "test.txt", 6000)
    out = tmp_path / "out"
    recipe = write(
        tmp_path,
        model=str(model),
        method="wanda",
        sparsity=0.7,
        calib_data=str(train),
        nsamples=8,
        seqlen=64,
        lora={"r": 4, "alpha": 8},
        max_steps=2,
        train_batch_size=2,
        lr=1e-3,
        eval_data=str(test),
        out=str(out),
    )
    report = run_finetune_recipe(recipe)
    assert set(report["metrics"]) == {"ppl_dense", "ppl_pruned", "ppl_lora_unmerged", "ppl_finetuned"}
    assert report["sparsity"] == pytest.approx(0.7, abs=0.002) and report["state_dict_keys_unchanged"]
    saved = json.loads((out / "finetune_report.json").read_text())
    assert saved["metrics"] == report["metrics"] and (out / "recipe.yaml").exists()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    weight = reloaded.model.layers[0].mlp.down_proj.weight
    assert float((weight == 0).float().mean()) == pytest.approx(0.7, abs=0.002)


@pytest.mark.slow
def test_convnext_gradual_recipe_end_to_end(tmp_path):
    model = fixture_path("convnext-digits")
    train, val = image_subset(tmp_path, "train", 8), image_subset(tmp_path, "val", 5)
    recipe = write(
        tmp_path,
        model=f"local-dir:{model}",
        method="wanda",
        sparsity=0.8,
        group="per-layer",
        schedule="cubic",
        end_step=4,
        every_n_steps=2,
        calib_batches=1,
        max_steps=5,
        train_data=str(train),
        calib_data=None,
        train_batch_size=16,
        lr=2e-4,
        eval_data=str(val),
        eval_batch_size=50,
        out=str(tmp_path / "out"),
    )
    report = run_finetune_recipe(recipe)
    assert set(report["metrics"]) >= {"top1_dense", "top1_finetuned"}
    assert report["sparsity"] == pytest.approx(0.8, abs=1e-3) and report["state_dict_keys_unchanged"]
    assert [e["event_step"] for e in report["history"]] == [2, 4]
    from prunekit.io.timm import load_vision_model

    reloaded = load_vision_model(str(tmp_path / "out"))
    assert float((reloaded.stages[1].blocks[0].mlp.fc1.weight == 0).float().mean()) == pytest.approx(0.8, abs=1e-3)


def test_missing_training_data_is_one_line_before_any_loading(tmp_path, monkeypatch):
    """A relative path beside an existing folder, or with a file suffix, is a missing file, not a hub name."""
    from prunekit.errors import PrunekitError
    from prunekit.finetune.recipe import load_finetune_recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(PrunekitError, match="train_data 'data/train' does not exist; give an existing"):
        load_finetune_recipe(None, {"model": "m", "train_data": "data/train"})
    with pytest.raises(PrunekitError, match="val_data 'val.txt' does not exist"):
        load_finetune_recipe(None, {"model": "m", "train_data": str(tmp_path / "data"), "val_data": "val.txt"})


def test_a_model_class_finetune_cannot_train_is_one_line_before_loading(tmp_path, monkeypatch):
    """A masked LM once went down the causal-LM training path; now it is refused from config.json alone."""
    from prunekit.errors import PrunekitError
    from prunekit.finetune.recipe import load_finetune_recipe
    from prunekit.finetune.run import run_finetune
    from tests import zoo

    zoo.save("bert", tmp_path / "bert")
    (tmp_path / "train.txt").write_text("In the beginning God created the heaven and the earth.\n" * 40)
    monkeypatch.setattr("prunekit.io.hf.load_hf_model", lambda *a, **k: pytest.fail("weights were loaded"))
    recipe = load_finetune_recipe(
        None, {"model": str(tmp_path / "bert"), "train_data": str(tmp_path / "train.txt"), "out": str(tmp_path / "o")}
    )
    with pytest.raises(PrunekitError, match="loads as masked-lm"):
        run_finetune(recipe)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(schedule="cubic", end_step=5, every_n_steps=0), "every_n_steps"),
        (dict(schedule="cubic", end_step=5, initial_sparsity=0.9), "initial_sparsity"),
        (dict(max_steps=0), "max_steps"),
        (dict(lr="1e-4"), "lr must be a number"),
        (dict(schedule="cubic", end_step=5, nsamples=7), "--nsamples"),
    ],
)
def test_a_finetune_recipe_made_in_python_is_checked_when_made(tmp_path, settings, message):
    """Issue 28 item 5: ``run_finetune(FinetuneRecipe(...))`` used to skip the fine-tune checks, and schedule
    values failed only after the model loaded."""
    text = tmp_path / "train.txt"
    text.write_text("in the beginning\n")
    with pytest.raises(PrunekitError, match=message):
        FinetuneRecipe(model="m", calib_data=str(text), **settings)
