"""Recovery by knowledge distillation: the student (a pruned model) matches the teacher's (the dense model's)
token distribution and, optionally, its hidden states. ``Distillation`` holds the settings, ``losses`` the terms as
tensor functions, ``Teacher`` the frozen model, ``DistillationCallback`` + ``distillation_loss`` the Lightning glue
that ``prunekit finetune`` uses and that any LightningModule can use."""

from .callback import DistillationCallback, distillation_loss
from .losses import hidden_state_loss, kd_loss, teacher_blocks
from .settings import Distillation
from .teacher import Teacher, frozen_copy, load_teacher

__all__ = [
    "Distillation",
    "DistillationCallback",
    "Teacher",
    "distillation_loss",
    "frozen_copy",
    "hidden_state_loss",
    "kd_loss",
    "load_teacher",
    "teacher_blocks",
]
