"""``prunekit finetune``: load, evaluate, prune (one-shot) or not, recover with Lightning (full, LoRA, or full then
LoRA; distilling from the dense model or not), merge LoRA, evaluate again, save atomically (model,
``finetune_report.json``, the resolved ``recipe.yaml``)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import lightning.pytorch as L
from torch import nn

from ..api import layer_sparsity, versions
from ..commands import claimed, evaluate, load_job, prune_with_recipe, validate
from ..config import PruneConfig
from ..distill import Distillation, DistillationCallback, frozen_copy, load_teacher, teacher_blocks
from ..errors import PrunekitError
from ..graph import select_layers
from ..io import OutputClaim, write_json, write_model
from ..io.paths import local_path
from ..lightning import PruningCallback
from ..model_classes import TIMM, Job, ModelClass, Prepared
from ..recipe import dump_recipe, recipe_dict
from ..schedule import Schedule
from .causal_lm import CausalLMModule, TextDataModule
from .lora import add_lora, keep_masks, merge_lora_keep_sparsity
from .recipe import FinetuneRecipe, callback_config, load_finetune_recipe

log = logging.getLogger(__name__)


def run_finetune_recipe(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The CLI entry point: ``prunekit finetune --recipe PATH [flags]``; returns the report dict."""
    return run_finetune(load_finetune_recipe(path, overrides), path)


def run_finetune(recipe: FinetuneRecipe, recipe_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Prune (one-shot) or not, fine-tune, evaluate; ``--out`` is claimed before loading and written at the end."""
    inputs = {
        **validate(recipe, recipe_path),
        "--train-data": recipe.training_data,
        "--val-data": recipe.val_data,
        "--teacher": str(local_path(recipe.teacher) or recipe.teacher) if recipe.teacher else None,
    }
    _check_trainable_class(recipe)
    with claimed(recipe, inputs) as claim:
        report = _run(recipe)
        if claim is not None:
            _save(*report, recipe, claim)
    if recipe.report_json:
        write_json(recipe.report_json, report[2])
    return report[2]


def _run(recipe: FinetuneRecipe) -> tuple[nn.Module, Any, dict[str, Any]]:
    L.seed_everything(recipe.seed, verbose=False)
    job, calib, cache = load_job(recipe, calibrate=recipe.schedule == "oneshot")
    model, tokenizer = job.model, job.preprocessor
    task = _task(recipe, job.model_class)
    keys, timings = list(model.state_dict()), {}
    teacher = _teacher(model, recipe)  # before pruning: the model the run started from
    metrics = _prefixed(evaluate(model, job, cache), "dense")
    start = time.perf_counter()
    pruned = prune_with_recipe(model, recipe, calib).to_dict() if recipe.schedule == "oneshot" else None
    timings["prune_s"] = time.perf_counter() - start
    if pruned is not None:
        metrics.update(_prefixed(evaluate(model, job, cache), "pruned"))
    distiller = _distiller(recipe, teacher, pruned)
    start = time.perf_counter()
    model, history = _finetune(model, job, task, pruned, metrics, cache, distiller)
    timings["finetune_s"] = time.perf_counter() - start
    metrics.update(_prefixed(evaluate(model, job, cache), "finetuned"))
    report = _report(model, recipe, task, metrics, history, timings, keys)
    if pruned is not None and pruned.get("structure"):
        report["structure"] = pruned["structure"]  # what a structured method removed
    if distiller is not None:
        report["distillation"] = {"block_map": distiller.block_map, "steps": distiller.history}
    return model, tokenizer, report


def _teacher(model: nn.Module, recipe: FinetuneRecipe) -> nn.Module | None:
    """The distillation teacher, made before any pruning: the checkpoint ``teacher`` names, or a frozen copy of
    the loaded model (one more copy of the weights in memory); None when nothing is distilled."""
    if not Distillation.of(recipe).active:
        return None
    if recipe.teacher:
        return load_teacher(recipe.teacher, recipe.dtype, recipe.trust_remote_code)
    return frozen_copy(model)


def _distiller(recipe: FinetuneRecipe, teacher: nn.Module | None, pruned: dict | None) -> DistillationCallback | None:
    """After depth pruning, student block ``i`` is matched to the teacher block it came from."""
    if teacher is None:
        return None
    block_map = teacher_blocks((pruned or {}).get("structure"))
    return DistillationCallback(Distillation.of(recipe), teacher=teacher, block_map=block_map)


def _check_trainable_class(recipe: FinetuneRecipe) -> None:
    """Fine-tuning trains causal LMs and timm image classifiers; another Hugging Face class (masked LM, seq2seq, VLM)
    would silently go down the causal-LM path. Read from config.json before anything loads."""
    from ..io.hf import load_config
    from ..io.timm import is_vision_source
    from ..model_classes import resolve_model_class

    if not recipe.model or is_vision_source(recipe.model):
        return
    config = load_config(recipe.model, recipe.trust_remote_code)
    model_class = resolve_model_class(config, recipe.model_class, recipe.model)
    if model_class not in TASKS:
        raise PrunekitError(
            f"prunekit finetune trains causal LMs and timm / torchvision image classifiers; {recipe.model!r} loads as "
            f"{model_class}: prune it with prunekit prune and fine-tune it with your own training loop"
        )


# What each model class fine-tunes as (``_check_trainable_class`` lets only these through).
TASKS = {"causal-lm": "causal-lm", TIMM: "image-classification"}


def _task(recipe: FinetuneRecipe, model_class: ModelClass) -> str:
    task = recipe.task or TASKS[model_class.name]
    if task != TASKS[model_class.name]:
        raise PrunekitError(f"task {task!r} does not match the model {recipe.model!r}; drop task: to infer it")
    if recipe.recovery_kind != "full" and task != "causal-lm":
        raise PrunekitError(
            f"recovery: {recipe.recovery_kind} (LoRA) is implemented for causal LMs; use recovery: full for image "
            "models"
        )
    return task


def _prefixed(values: dict[str, float], stage: str) -> dict[str, float]:
    return {f"{k}_{stage}": v for k, v in values.items()}


def pruning_callback(recipe: FinetuneRecipe) -> PruningCallback:
    """The callback a recipe asks for: hold the one-shot prune's zeros in the selected layers (``fixed``), or
    prune gradually (``cubic``)."""
    if recipe.schedule == "oneshot":
        selection = PruneConfig(include=recipe.include, exclude=recipe.exclude, layer_types=recipe.layer_types)
        return PruningCallback(selection, schedule="fixed")
    return PruningCallback(callback_config(recipe), schedule=Schedule.of(recipe))


def finetune_trainer(recipe: FinetuneRecipe, callbacks: list, steps: int | None = None, **kwargs: Any) -> L.Trainer:
    """``steps`` (default ``max_steps``) of training, no checkpoints or logger files; validation 4 times when there
    is val_data."""
    steps = steps or recipe.max_steps
    val = (
        dict(val_check_interval=max(steps // 4, 1), check_val_every_n_epoch=None)
        if recipe.val_data
        else dict(limit_val_batches=0)
    )
    opts = dict(
        max_steps=steps,
        precision=recipe.precision,
        logger=False,
        enable_checkpointing=False,
        accumulate_grad_batches=recipe.accumulate_grad_batches,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        **val,
    )
    return L.Trainer(callbacks=callbacks, **{**opts, **kwargs})


def _finetune(
    model: nn.Module,
    job: Job,
    task: str,
    pruned: dict | None,
    metrics: dict,
    cache: Prepared,
    distiller: DistillationCallback | None,
) -> tuple[nn.Module, list]:
    recipe, extra = job.recipe, [distiller] if distiller is not None else []
    if task == "image-classification":
        return _finetune_image(model, recipe, extra)
    history, done, stages = [], 0, recipe.stages()
    for i, (stage, steps) in enumerate(stages):
        offset = done * recipe.train_batch_size * recipe.accumulate_grad_batches
        data = _text_data(job.preprocessor, recipe, offset=offset)
        if stage == "full":
            callback, module = pruning_callback(recipe), _lm_module(model, recipe.lr, recipe)
            finetune_trainer(recipe, [callback, *extra], steps).fit(module, datamodule=data)
            history += callback.history
        else:
            model = _lora_stage(model, job, pruned, metrics, cache, data, steps, extra)
        if i < len(stages) - 1:  # what the first stage reached, before the next
            metrics.update(_prefixed(evaluate(model, job, cache), stage))
        done += steps
    return model, history


def _text_data(tokenizer: Any, recipe: FinetuneRecipe, offset: int) -> TextDataModule:
    """The training windows; a later stage starts ``offset`` windows into the seeded stream (where the last
    stopped), so every stage sees new text."""
    return TextDataModule(
        tokenizer,
        recipe.training_data,
        recipe.val_data,
        recipe.train_seqlen or recipe.seqlen,
        recipe.train_batch_size,
        recipe.seed,
        recipe.num_workers or 0,
        offset=offset,
    )


def _lora_stage(
    model: nn.Module,
    job: Job,
    pruned: dict | None,
    metrics: dict,
    cache: Prepared,
    data: TextDataModule,
    steps: int,
    callbacks: list,
) -> nn.Module:
    """LoRA adapters on the pruned layers, trained, evaluated unmerged, merged back without losing a zero."""
    recipe = job.recipe
    masks = keep_masks(model, names=pruned["layers"])  # none after a structured method: nothing to keep at zero
    lora = dict(recipe.lora or {})
    masked = lora.pop("masked", True)  # train dW * M, so the merged model is the trained one
    adapted = add_lora(model, **lora, masks=masks if masked and masks else None)
    module = _lm_module(adapted, recipe.lora_lr or recipe.lr, recipe)
    finetune_trainer(recipe, callbacks, steps).fit(module, datamodule=data)
    metrics.update(_prefixed(evaluate(adapted, job, cache), "lora_unmerged"))
    return merge_lora_keep_sparsity(adapted, masks)


def _lm_module(model: nn.Module, lr: float, recipe: FinetuneRecipe) -> CausalLMModule:
    return CausalLMModule(model.train(), lr=lr, weight_decay=recipe.weight_decay, warmup_steps=recipe.warmup_steps)


def _finetune_image(model: nn.Module, recipe: FinetuneRecipe, extra: list) -> tuple[nn.Module, list]:
    from ..eval.image import ImageClassifier, ImageDataModule

    data = ImageDataModule.for_model(
        model,
        train=recipe.training_data,
        val=recipe.val_data,
        batch_size=recipe.train_batch_size,
        num_workers=recipe.num_workers or 0,
        train_augment=recipe.train_augment,
    )
    callback = pruning_callback(recipe)
    module = ImageClassifier(model, lr=recipe.lr, weight_decay=recipe.weight_decay)
    finetune_trainer(recipe, [callback, *extra]).fit(module, datamodule=data)
    return model.eval(), callback.history


def _report(
    model: nn.Module, recipe: FinetuneRecipe, task: str, metrics: dict, history: list, timings: dict, keys: list[str]
) -> dict[str, Any]:
    layers, overall = layer_sparsity(select_layers(model, recipe.include, recipe.exclude, recipe.layer_types))
    log.info("fine-tuned %s: sparsity %.4f, %s", task, overall, metrics)
    return {
        "task": task,
        "settings": recipe_dict(recipe),
        "metrics": metrics,
        "sparsity": overall,
        "layers": layers,
        "history": history,
        "timings": timings,
        "state_dict_keys_unchanged": list(model.state_dict()) == keys,
        "versions": versions(),
    }


def _save(model: nn.Module, tokenizer: Any, report: dict, recipe: FinetuneRecipe, claim: OutputClaim) -> None:
    with claim.staging() as tmp:
        write_model(model, tmp, tokenizer, recipe.save_format)
        write_json(tmp / "finetune_report.json", report)
        dump_recipe(recipe, tmp / "recipe.yaml")
    log.info("saved fine-tuned model to %s", claim.out)
