"""``FinetuneRecipe``: every key of a prune recipe plus the fine-tuning ones, one flat YAML mapping.

``schedule: oneshot`` prunes before fine-tuning exactly as ``prunekit prune`` does (calibration on
``calib_data``, block by block), then recovers by one of Shortened LLaMA's schedules (Kim et al. 2024):
``recovery: full`` trains every weight with the masks held (continued pre-training), ``lora`` trains LoRA adapters
merged back without losing a zero, ``full+lora`` one then the other, the LoRA stage continuing the data stream where
the full stage stopped. ``schedule: cubic`` prunes gradually during full fine-tuning with ``PruningCallback``. Any
of them may distil from the dense model (the ``Distillation`` keys) instead of, or beside, the next-token loss.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ..config import PruneConfig, refuse_unused, setting
from ..distill.settings import Distillation, normalise_layers
from ..errors import PrunekitError
from ..io.paths import local_path, looks_local, require_local
from ..recipe import PruneRecipe, load_recipe
from ..schedule import CALLBACK_CALIBRATION, CALLBACK_USES, Schedule

TASKS = ("causal-lm", "image-classification")
FINETUNE_SCHEDULES = ("oneshot", "cubic")  # "fixed" is the callback's way of holding a one-shot prune's masks
LORA_KEYS = {"r", "alpha", "dropout", "target_modules", "masked"}
RECOVERIES = ("full", "lora", "full+lora")
FINETUNE_UNUSED_WHY = (
    "fine-tuning keeps no progress block by block (Lightning has its own checkpoints) and is not launched by torchrun"
)


@dataclass(frozen=True)
class FinetuneRecipe(PruneRecipe, Schedule, Distillation):
    """``prunekit finetune``: a prune recipe, the pruning ``Schedule`` during training, the ``Distillation`` terms
    and the training settings. ``batch_size``/``nsamples``/``seqlen`` are the calibration's, as in ``prune``.
    Checked when made."""

    train_data: str | None = setting(
        None, "text file / ImageFolder tree to fine-tune on (default: calib_data)", example="train.txt"
    )
    val_data: str | None = setting(None, "optional validation during training (val loss / top-1)", example="val.txt")
    lora: dict | None = setting(
        None,
        "LoRA adapters (LLMs) for recovery lora or full+lora: r, alpha, dropout, target_modules, masked (default "
        "r 8, alpha 16); merged back without losing a zero. Given alone, it means recovery: lora",
        flag="--lora",
        keyvalue=True,
        example={"r": 4},
    )
    recovery: str | None = setting(
        None,
        "full (every weight, masks held), lora (adapters merged back) or full+lora (full_steps of full, then LoRA "
        "for the rest); default: lora when lora: is given, else full",
        example="full+lora",
    )
    full_steps: int | None = setting(
        None,
        "full+lora: steps of the full stage; LoRA runs the rest of max_steps (default: half)",
        type=int,
        example=1,
        example_with={"recovery": "full+lora"},
    )
    lora_lr: float | None = setting(
        None,
        "learning rate of the LoRA stage (default: lr)",
        type=float,
        example=1e-3,
        example_with={"recovery": "lora"},
    )
    max_steps: int = setting(300, "training steps (all stages together)", type=int, example=2)
    train_batch_size: int = setting(8, "training batch size", type=int, example=2)
    train_seqlen: int | None = setting(None, "LLM window length for training (default: seqlen)", type=int, example=32)
    lr: float = setting(1e-4, "AdamW learning rate", type=float, example=3e-4)
    weight_decay: float = setting(0.0, "AdamW weight decay", type=float, example=0.01)
    warmup_steps: int = setting(0, "linear learning-rate warm-up steps", type=int, example=1)
    precision: str = setting("32-true", "Lightning precision, e.g. bf16-mixed", example="bf16-mixed")
    accumulate_grad_batches: int = setting(1, "batches per optimizer step", type=int, example=2)
    train_augment: bool = setting(
        False, "images: timm's training augmentation instead of eval preprocessing", type=bool, example=True
    )
    task: str | None = setting(
        None, "causal-lm or image-classification (default: from the model source)", example="causal-lm"
    )

    def __post_init__(self) -> None:
        normalise_layers(self)  # before the type checks that PruneConfig runs on every field
        super().__post_init__()
        check_finetune(self)

    @property
    def training_data(self) -> str:
        return self.train_data or self.calib_data

    @property
    def recovery_kind(self) -> str:
        return self.recovery or ("lora" if self.lora is not None else "full")

    def stages(self) -> list[tuple[str, int]]:
        """The recovery as ``(full | lora, steps)`` stages, in order; their steps add up to ``max_steps``."""
        if self.recovery_kind != "full+lora":
            return [(self.recovery_kind, self.max_steps)]
        full = self.full_steps or self.max_steps // 2
        return [("full", full), ("lora", self.max_steps - full)]


def check_finetune(recipe: FinetuneRecipe) -> None:
    """The fine-tuning checks that need no model (the prune keys are checked by ``PruneRecipe``)."""
    if recipe.schedule not in FINETUNE_SCHEDULES:
        raise PrunekitError(f"schedule must be one of {', '.join(FINETUNE_SCHEDULES)}, got {recipe.schedule!r}")
    Schedule.of(recipe).check_target(recipe.sparsity, recipe.pattern)  # and the schedule's own checks
    unused = ("resume", "dist_timeout")
    used = [f.name for f in dataclasses.fields(recipe) if f.name not in unused]
    refuse_unused(recipe, used, "prunekit finetune", FINETUNE_UNUSED_WHY)
    if recipe.task is not None and recipe.task not in TASKS:
        raise PrunekitError(f"task must be one of {TASKS}, got {recipe.task!r}")
    if recipe.lazy:
        raise PrunekitError("fine-tuning trains the whole model in memory: drop lazy (--lazy)")
    if not recipe.training_data:
        raise PrunekitError("fine-tuning needs train_data (or calib_data) to train on")
    if recipe.target is not None:
        raise PrunekitError(
            "target searches the sparsity with `prunekit prune --target`; fine-tuning prunes to one sparsity: find "
            "it with prunekit prune --target, then set sparsity"
        )
    _check_training(recipe)
    _check_recovery(recipe)
    _check_distillation(recipe)
    if recipe.schedule == "cubic" and recipe.structured:
        raise PrunekitError(
            f"structured method {recipe.method!r} changes shapes once, before training: use schedule: oneshot"
        )
    if recipe.schedule == "cubic":
        refuse_unused(callback_config(recipe), CALLBACK_USES, "schedule: cubic", CALLBACK_CALIBRATION)
    if recipe.schedule == "cubic" and (recipe.end_step or 0) > recipe.max_steps:
        raise PrunekitError(
            f"end_step {recipe.end_step} is after max_steps {recipe.max_steps}: the target sparsity "
            "would never be reached"
        )
    for key, path in (("train_data", recipe.training_data), ("val_data", recipe.val_data)):
        if path and looks_local(path):
            require_local(path, key, "give an existing text file, data file or ImageFolder tree")


def _check_recovery(recipe: FinetuneRecipe) -> None:
    if recipe.recovery is not None and recipe.recovery not in RECOVERIES:
        raise PrunekitError(f"unknown recovery {recipe.recovery!r}; choose from {', '.join(RECOVERIES)}")
    kind = recipe.recovery_kind
    if recipe.lora is not None and set(recipe.lora) - LORA_KEYS:
        raise PrunekitError(f"unknown lora key(s) {sorted(set(recipe.lora) - LORA_KEYS)}; known: {sorted(LORA_KEYS)}")
    if kind == "full":
        refuse_unused(recipe, _all_but("lora", "lora_lr"), "recovery: full", "it trains no LoRA adapters")
    if kind != "full+lora":
        refuse_unused(recipe, _all_but("full_steps"), f"recovery: {kind}", "it has one stage")
    elif not 1 <= (recipe.full_steps or recipe.max_steps // 2) < recipe.max_steps:
        raise PrunekitError(
            f"full+lora needs full_steps in [1, max_steps - 1] (max_steps={recipe.max_steps}), got "
            f"{recipe.full_steps}: each stage needs at least one step"
        )
    if kind != "full" and recipe.schedule != "oneshot":
        raise PrunekitError(
            f"recovery: {kind}: LoRA freezes the base weights, so they cannot be pruned gradually: use "
            "schedule: oneshot"
        )
    if recipe.lora_lr is not None and recipe.lora_lr <= 0:
        raise PrunekitError(f"lora_lr must be > 0, got {recipe.lora_lr}")


def _check_distillation(recipe: FinetuneRecipe) -> None:
    distillation = Distillation.of(recipe)  # its own checks, and the refusal of terms that would be ignored
    if distillation.hidden_weight > 0 and recipe.method == "slicegpt":
        raise PrunekitError(
            "SliceGPT rotates and narrows the hidden states, so they cannot be matched to the teacher's: drop "
            "hidden_weight and distil with kd_weight"
        )
    local = local_path(recipe.teacher) is not None if recipe.teacher else False
    if local and (recipe.teacher.startswith("local-dir:") or looks_local(recipe.teacher)):
        fix = "give an existing checkpoint directory, a hub id or a timm: name"
        require_local(recipe.teacher.removeprefix("local-dir:"), "teacher", fix)


def _all_but(*names: str) -> set[str]:
    return {f.name for f in dataclasses.fields(FinetuneRecipe)} - set(names)


def callback_config(recipe: FinetuneRecipe) -> PruneConfig:
    """The prune settings a cubic schedule hands to ``PruningCallback``: all but those fine-tuning itself uses
    (``seqlen``: the training windows' length; ``seed``: seeds the whole run; ``dtype``: how the model loads;
    ``device``: where it is evaluated)."""
    return dataclasses.replace(recipe.as_config(), seqlen=None, seed=0, dtype="auto", device=None)


def _check_training(recipe: FinetuneRecipe) -> None:
    for name in ("max_steps", "train_batch_size", "accumulate_grad_batches"):
        if getattr(recipe, name) < 1:
            raise PrunekitError(f"{name} must be >= 1, got {getattr(recipe, name)}")
    if recipe.train_seqlen is not None and recipe.train_seqlen < 2:
        raise PrunekitError(f"train_seqlen must be >= 2 tokens, got {recipe.train_seqlen}")
    if recipe.lr <= 0 or recipe.weight_decay < 0 or recipe.warmup_steps < 0:
        raise PrunekitError(
            f"lr must be > 0, weight_decay and warmup_steps >= 0; got lr={recipe.lr}, "
            f"weight_decay={recipe.weight_decay}, warmup_steps={recipe.warmup_steps}"
        )


def load_finetune_recipe(path: str | os.PathLike | None, overrides: dict | None = None) -> FinetuneRecipe:
    """A ``FinetuneRecipe`` from YAML with CLI ``overrides`` (flags the user set) on top; unknown keys fail."""
    return load_recipe(FinetuneRecipe, path, overrides or {})
