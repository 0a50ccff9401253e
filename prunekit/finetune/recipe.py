"""``FinetuneRecipe``: every key of a prune recipe plus the fine-tuning ones, one flat YAML mapping.

``schedule: oneshot`` prunes before fine-tuning exactly as ``prunekit prune`` does (calibration on
``calib_data``, block by block), then fine-tunes with the masks held (or with LoRA adapters merged back
without losing a zero); ``schedule: cubic`` prunes gradually during fine-tuning with ``PruningCallback``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import PrunekitError
from ..io.paths import looks_local, require_local
from ..lightning import SCHEDULES
from ..recipe import PruneRecipe, load_yaml, recipe_from_dict

TASKS = ("causal-lm", "image-classification")
LORA_KEYS = {"r", "alpha", "dropout", "target_modules", "masked"}


@dataclass(frozen=True)
class FinetuneRecipe(PruneRecipe):
    """``prunekit finetune``. ``batch_size``/``nsamples``/``seqlen`` are the calibration's, as in ``prune``."""

    train_data: str | None = None  # text file / ImageFolder tree to fine-tune on (default: calib_data)
    val_data: str | None = None  # optional validation during training (val loss / top-1)
    schedule: str = "oneshot"  # oneshot: prune, then fine-tune; cubic: prune gradually while training
    start_step: int = 0
    end_step: int | None = None  # cubic: the step the target sparsity is reached
    every_n_steps: int = 100
    initial_sparsity: float = 0.0
    calib_batches: int = 16  # cubic: training batches each re-scoring runs
    lora: dict | None = None  # {r, alpha, dropout, target_modules, masked}: LoRA recovery (LLMs)
    max_steps: int = 300
    train_batch_size: int = 8
    train_seqlen: int | None = None  # LLM window length for training (default: seqlen)
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    precision: str = "32-true"  # Lightning precision, e.g. bf16-mixed
    accumulate_grad_batches: int = 1
    train_augment: bool = False  # images: timm's training augmentation instead of eval preprocessing
    task: str | None = None  # causal-lm / image-classification; default: from the model source

    @property
    def training_data(self) -> str:
        return self.train_data or self.calib_data


def check_finetune(recipe: FinetuneRecipe) -> None:
    """The fine-tuning checks that need no model (the prune keys are checked by ``commands.validate``)."""
    if recipe.schedule not in SCHEDULES[:2]:
        raise PrunekitError(f"schedule must be one of {SCHEDULES[:2]}, got {recipe.schedule!r}")
    if recipe.task is not None and recipe.task not in TASKS:
        raise PrunekitError(f"task must be one of {TASKS}, got {recipe.task!r}")
    if not recipe.training_data:
        raise PrunekitError("fine-tuning needs train_data (or calib_data) to train on")
    if recipe.target is not None:
        raise PrunekitError(
            "target searches the sparsity with `prunekit prune --target`; fine-tuning prunes to one sparsity: find "
            "it with prunekit prune --target, then set sparsity"
        )
    if recipe.lora is not None and set(recipe.lora) - LORA_KEYS:
        raise PrunekitError(f"unknown lora key(s) {sorted(set(recipe.lora) - LORA_KEYS)}; known: {sorted(LORA_KEYS)}")
    if recipe.lora is not None and recipe.schedule != "oneshot":
        raise PrunekitError("LoRA freezes the base weights, so they cannot be pruned gradually: use schedule: oneshot")
    if recipe.schedule == "cubic" and recipe.structured:
        raise PrunekitError(
            f"structured method {recipe.method!r} changes shapes once, before training: use schedule: oneshot"
        )
    if recipe.schedule == "cubic" and recipe.allocation != "uniform":
        raise PrunekitError("the cubic schedule prunes every layer to the same sparsity; use allocation: uniform")
    if recipe.schedule == "cubic" and (recipe.end_step or 0) > recipe.max_steps:
        raise PrunekitError(
            f"end_step {recipe.end_step} is after max_steps {recipe.max_steps}: the target sparsity "
            "would never be reached"
        )
    for key, path in (("train_data", recipe.training_data), ("val_data", recipe.val_data)):
        if path and looks_local(path):
            require_local(path, key, "give an existing text file, data file or ImageFolder tree")


def load_finetune_recipe(path: str | os.PathLike | None, overrides: dict | None = None) -> FinetuneRecipe:
    """A ``FinetuneRecipe`` from YAML with CLI ``overrides`` (flags the user set) on top; unknown keys fail."""
    data = load_yaml(path) if path else {}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    recipe = recipe_from_dict(FinetuneRecipe, data, source=str(path) if path else "command line")
    check_finetune(recipe)
    return recipe
