"""``prunekit finetune`` end to end on a tiny in-process Llama: Shortened LLaMA's recovery schedules with
distillation, and the teacher made from the model the run started from or read from a checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

import prunekit
from prunekit.cli import demo_assets
from prunekit.errors import PrunekitError
from prunekit.finetune import load_finetune_recipe, run_finetune
from prunekit.finetune.recipe import FinetuneRecipe
from tests import zoo


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-block zoo Llama with the KJV tokenizer, a confident teacher (its head scaled up: a KL far from zero),
    and a little KJV text: 12,000 characters, and a file of two 32-token windows (every batch of 2 is the same)."""
    root = tmp_path_factory.mktemp("tiny")
    zoo.save("llama", root / "model")
    teacher = zoo.build("llama", seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20)
    zoo.save("llama", root / "teacher", teacher)
    text = (demo_assets() / "kjv" / "train.txt").read_text()
    (root / "train.txt").write_text(text[:12000])
    (root / "two-windows.txt").write_text(text[:330])
    (root / "test.txt").write_text(text[-3000:])
    return root


def recipe(root, **settings) -> FinetuneRecipe:
    base = dict(
        model=str(root / "model"),
        calib_data=str(root / "train.txt"),
        nsamples=2,
        seqlen=32,
        max_steps=6,
        train_batch_size=2,
        lr=1e-2,
        eval_data=str(root / "test.txt"),
        eval_seqlen=32,
    )
    return FinetuneRecipe(**{**base, **settings})


def test_full_then_lora_with_distillation_after_depth_pruning(tiny):
    """The bundled kjv-llama-5m (trained: its distribution is far from uniform) loses a block, then recovers by
    distillation from its dense copy: 4 full steps, then 2 LoRA steps, on the same batch every step."""
    out = tiny / "out"
    report = run_finetune(
        recipe(
            tiny,
            model=str(demo_assets() / "kjv-llama-5m"),
            method="depth",
            sparsity=0.25,
            train_data=str(tiny / "two-windows.txt"),
            recovery="full+lora",
            full_steps=4,
            lora={"r": 4},
            lr=1e-3,
            lora_lr=1e-3,
            kd_weight=1.0,
            task_loss_weight=0.0,
            hidden_weight=0.1,
            out=str(out),
        )
    )
    assert set(report["metrics"]) == {"ppl_dense", "ppl_pruned", "ppl_full", "ppl_lora_unmerged", "ppl_finetuned"}
    removed = report["structure"]["removed_blocks"]
    assert report["distillation"]["block_map"] == [i for i in range(4) if i not in removed]
    steps = report["distillation"]["steps"]
    assert [(row["fit"], row["step"]) for row in steps] == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1)]
    assert steps[-1]["kd"] < 0.6 * steps[0]["kd"]  # the student learns the teacher's distribution
    saved = json.loads((out / "finetune_report.json").read_text())
    assert saved["distillation"] == report["distillation"]
    assert prunekit.load(out).config.num_hidden_layers == 3


def test_the_teacher_is_the_model_before_pruning_or_a_checkpoint(tiny):
    """The dense copy is taken before pruning (a copy of the pruned model would give a KL of 0 at step 0); a
    teacher checkpoint is loaded instead of it (the confident one: a KL of several nats)."""
    settings = dict(method="magnitude", sparsity=0.6, recovery="lora", max_steps=1, kd_weight=1.0, eval_data=None)
    copy_kd = run_finetune(recipe(tiny, **settings))["distillation"]["steps"][0]["kd"]
    checkpoint_kd = run_finetune(recipe(tiny, **settings, teacher=str(tiny / "teacher")))["distillation"]["steps"]
    assert 0 < copy_kd < 0.1 < 1.0 < checkpoint_kd[0]["kd"]


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(recovery="full", lora={"r": 4}), "recovery: full does not use --lora"),
        (dict(recovery="full", lora_lr=1e-3), "recovery: full does not use --lora-lr"),
        (dict(recovery="lora", full_steps=2), "recovery: lora does not use --full-steps"),
        (dict(recovery="full+lora", full_steps=6, max_steps=6), "full_steps in \\[1, max_steps - 1\\]"),
        (dict(recovery="full+lora", schedule="cubic", end_step=4), "LoRA freezes"),
        (dict(recovery="distil"), "unknown recovery"),
        (dict(method="slicegpt", sparsity=0.1, hidden_weight=1.0), "SliceGPT rotates"),
        (dict(kd_weight=1.0, teacher="./missing-teacher"), "teacher './missing-teacher' does not exist"),
        (dict(kd_temperature=2.0), "without distillation does not use --kd-temperature"),
    ],
)
def test_recovery_and_distillation_settings_are_refused_when_made(tiny, settings, message):
    with pytest.raises(PrunekitError, match=message):
        recipe(tiny, **settings)


def test_stages_split_the_steps(tiny):
    assert recipe(tiny, recovery="full+lora").stages() == [("full", 3), ("lora", 3)]
    assert recipe(tiny, recovery="full+lora", full_steps=5).stages() == [("full", 5), ("lora", 1)]
    assert recipe(tiny, lora={"r": 4}).stages() == [("lora", 6)]  # lora: given means LoRA, as before
    assert recipe(tiny).stages() == [("full", 6)]


def test_shipped_recovery_recipes_parse(monkeypatch):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    found = {}
    for path in sorted((root / "recipes").glob("llama-depth25-*.yaml")):
        r = load_finetune_recipe(path)
        found[(r.recovery_kind, r.kd_weight > 0)] = r
        assert (r.method, r.sparsity) == ("depth", 0.25)
    assert set(found) == {(kind, kd) for kind in ("lora", "full", "full+lora") for kd in (False, True)}
