"""Recovery by knowledge distillation: the student (a pruned model) matches the teacher's (the dense model's)
token distribution and, optionally, its hidden states. ``Distillation`` holds the settings, ``losses`` the terms as
tensor functions, ``Teacher`` the frozen model, ``DistillationCallback`` + ``distillation_loss`` the Lightning glue
that ``prunekit finetune`` uses and that any LightningModule can use.

Names are imported on first use, so the settings (which the fine-tune recipe, and so the CLI, reads) load without
torch or Lightning.
"""

from __future__ import annotations

from ..exports import lazy_exports

_EXPORTS = {
    "Distillation": "settings",
    "DistillationCallback": "callback",
    "distillation_loss": "callback",
    "hidden_state_loss": "losses",
    "kd_loss": "losses",
    "teacher_blocks": "losses",
    "Teacher": "teacher",
    "frozen_copy": "teacher",
    "load_teacher": "teacher",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
