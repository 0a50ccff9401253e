"""``DistillationCallback``: recovery by distillation in any Lightning training loop.

The callback holds the teacher (outside the LightningModule: not in its state dict, its optimizer or its
checkpoints) and watches the student: hooks record the inputs, the logits and the matched blocks' outputs of the
student's training forward pass. The module adds the distillation terms to its own loss in one line,

    def training_step(self, batch, batch_idx):
        loss = ...                                    # the task loss, computed as before
        return distillation_loss(self, loss)          # unchanged when the trainer has no DistillationCallback

which runs the teacher on the same inputs and returns ``task_loss_weight * loss + kd_weight * T^2 KL + hidden_weight
* hidden`` (``Distillation``). A training step that does not call it is an error before the first optimizer step.
``CausalLMModule`` and ``ImageClassifier`` call it already.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn

from ..errors import PrunekitError
from ..forward import block_output, model_device, target_module
from ..schedule import Schedule
from .losses import block_pairs, hidden_state_loss, kd_loss, token_mask
from .settings import Distillation
from .teacher import Teacher, blocks_of, frozen_copy, load_teacher, logits_of

log = logging.getLogger(__name__)


class DistillationCallback(L.Callback):
    """Distil ``teacher`` into ``pl_module.model`` (or ``submodule``) during ``trainer.fit``.

    ``settings`` (a ``Distillation``, or its fields as keywords: ``kd_weight``, ``kd_temperature``,
    ``task_loss_weight``, ``hidden_weight``, ``hidden_loss``, ``hidden_layers``, ``teacher_device``) say which terms
    and how much. ``teacher``: an ``nn.Module`` (frozen here), a checkpoint path, or None for a frozen copy of the
    student as ``fit`` starts, which is the dense model when ``PruningCallback`` prunes during training (with a
    model pruned before ``fit``, pass the dense model: ``copy.deepcopy(model)`` before pruning). ``block_map[i]``:
    the teacher block student block ``i`` came from (``teacher_blocks(report.structure)`` after depth pruning).
    """

    def __init__(
        self,
        settings: Distillation | None = None,
        *,
        teacher: nn.Module | str | None = None,
        block_map: Sequence[int] | None = None,
        submodule: str | None = None,
        **fields: Any,
    ):
        if isinstance(teacher, str):
            fields["teacher"] = teacher
            teacher = None
        self.settings = _settings(settings, fields)
        if not self.settings.active:
            raise PrunekitError(
                "DistillationCallback with kd_weight and hidden_weight 0 distils nothing: set kd_weight (e.g. 1.0) "
                "and/or hidden_weight"
            )
        self.block_map = None if block_map is None else list(block_map)
        self.submodule = submodule
        self.history: list[dict[str, float]] = []
        self._teacher_model, self._teacher = teacher, None
        self._pairs: dict[int, int] = {}
        self._handles: list = []
        self._record: dict[str, Any] | None = None
        self._called, self._step, self._fits = False, 0, 0

    @property
    def teacher(self) -> Teacher:
        if self._teacher is None:
            raise PrunekitError("DistillationCallback has not been set up yet: pass it to a Trainer and call fit()")
        return self._teacher

    # -------------------------------------------------------- Lightning hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self._teacher is not None:
            return  # a second fit (full then LoRA) keeps the same teacher
        model = self._teacher_model
        if model is None and self.settings.teacher is not None:
            model = load_teacher(self.settings.teacher)
        elif model is None:
            _check_not_pruned_before_fit(trainer)
            model = frozen_copy(self._student(pl_module))
            log.info("distillation teacher: a frozen copy of the model as fit starts")
        self._teacher = Teacher(model, self.settings.teacher_device)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.teacher.place(model_device(self._student(pl_module)))  # Lightning has placed the student by now

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fits += 1  # history rows say which fit (stage) they belong to
        student = self._student(pl_module)
        self._pairs = self._block_pairs(student) if self.settings.hidden_weight > 0 else {}
        blocks = blocks_of(student)
        self._handles = [
            student.register_forward_pre_hook(self._open, with_kwargs=True),
            student.register_forward_hook(self._close, with_kwargs=True),
            *(blocks[i].register_forward_hook(self._keeper(i)) for i in self._pairs),
        ]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._called, self._step = False, trainer.global_step

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if not self._called:
            raise PrunekitError(
                f"DistillationCallback: {type(pl_module).__name__}.training_step did not add the distillation terms; "
                "return prunekit.distill.distillation_loss(self, loss) from it"
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    # -------------------------------------------------------- the loss

    def loss(self, pl_module: L.LightningModule, task_loss: torch.Tensor) -> torch.Tensor:
        """The weighted sum of ``task_loss`` and the distillation terms for the student's last training forward."""
        record, self._record, self._called = self._record, None, True
        if record is None or "output" not in record:
            raise PrunekitError(
                "distillation_loss was called, but the student model has not run a training forward pass since the "
                "last call: run the model in training_step before it"
            )
        s = self.settings
        teacher_logits, teacher_hidden = self.teacher(record["args"], record["kwargs"], self._pairs.values())
        logits = logits_of(record["output"])
        mask = token_mask(record["kwargs"], logits.shape[:-1])
        terms = {"task": (s.task_loss_weight, task_loss)}
        if s.kd_weight > 0:
            terms["kd"] = (s.kd_weight, kd_loss(logits, teacher_logits, s.kd_temperature, mask))
        if s.hidden_weight > 0:
            per_block = [
                hidden_state_loss(record["hidden"][i], teacher_hidden[j], s.hidden_loss, mask)
                for i, j in self._pairs.items()
            ]
            terms["hidden"] = (s.hidden_weight, torch.stack(per_block).mean())
        total = sum(weight * value for weight, value in terms.values() if weight > 0)
        self._log(pl_module, {name: value for name, (_, value) in terms.items()}, total)
        return total

    # -------------------------------------------------------- internals

    def _student(self, pl_module: nn.Module) -> nn.Module:
        return target_module(pl_module, self.submodule)

    def _block_pairs(self, student: nn.Module) -> dict[int, int]:
        blocks, teacher_blocks = blocks_of(student), self.teacher.blocks
        if blocks is None or teacher_blocks is None:
            raise PrunekitError(
                f"hidden-state distillation needs a list of repeated blocks; {type(student).__name__} has none "
                "that prunekit finds: use kd_weight only"
            )
        pairs = block_pairs(len(blocks), len(teacher_blocks), self.settings.hidden_layers, self.block_map)
        log.info("hidden-state distillation: student block -> teacher block %s", pairs)
        return pairs

    def _open(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A training forward pass of the student starts: record it (calibration and validation run without
        gradients and are not recorded)."""
        self._record = {"args": args, "kwargs": kwargs, "hidden": {}} if _training(module) else None

    def _close(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._record is not None:
            self._record["output"] = output

    def _keeper(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._record is not None and "output" not in self._record:
                self._record["hidden"][index] = block_output(output)

        return hook

    def _log(self, pl_module: L.LightningModule, terms: dict[str, torch.Tensor], total: torch.Tensor) -> None:
        values = {name: float(value.detach()) for name, value in terms.items()}
        self.history.append({"fit": self._fits, "step": self._step, **values, "loss": float(total.detach())})
        pl_module.log_dict({f"distill/{name}": value for name, value in values.items()}, on_step=True)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._record = [], None


def distillation_loss(pl_module: L.LightningModule, task_loss: torch.Tensor) -> torch.Tensor:
    """``task_loss`` with the distillation terms of the trainer's ``DistillationCallback`` added; ``task_loss``
    itself outside training or when the trainer has none."""
    try:
        trainer = pl_module.trainer
    except RuntimeError:  # not attached to a Trainer: a plain call
        return task_loss
    if trainer is None or not trainer.training:
        return task_loss
    found = [c for c in trainer.callbacks if isinstance(c, DistillationCallback)]
    if len(found) > 1:
        raise PrunekitError("the trainer has several DistillationCallbacks; give it one (with every term in it)")
    return found[0].loss(pl_module, task_loss) if found else task_loss


def _settings(settings: Distillation | None, fields: dict[str, Any]) -> Distillation:
    if settings is None:
        names = {f.name for f in dataclasses.fields(Distillation)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise PrunekitError(f"unknown distillation setting(s) {unknown}; known: {', '.join(sorted(names))}")
        return Distillation(**fields)
    if fields:
        raise PrunekitError(f"pass the distillation settings {sorted(fields)} inside the Distillation, not beside it")
    return settings


def _training(module: nn.Module) -> bool:
    return torch.is_grad_enabled() and module.training


def _check_not_pruned_before_fit(trainer: L.Trainer) -> None:
    """A copy at fit start is the dense model only when pruning happens during fit."""
    fixed = (
        isinstance(getattr(c, "schedule", None), Schedule) and c.schedule.schedule == "fixed" for c in trainer.callbacks
    )
    if any(fixed):  # a PruningCallback holding the zeros of a model pruned before fit
        raise PrunekitError(
            "DistillationCallback without a teacher copies the model as fit starts, but PruningCallback(schedule="
            "'fixed') says it was pruned before fit: pass teacher= the dense model (copy.deepcopy(model) before "
            "pruning) or a checkpoint path"
        )
