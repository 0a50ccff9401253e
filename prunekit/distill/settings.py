"""``Distillation``: the loss terms of recovery by knowledge distillation and their weights, one settings object
for ``prunekit finetune`` (``FinetuneRecipe``'s recipe keys are its fields) and ``DistillationCallback``.

The training loss is ``task_loss_weight * task + kd_weight * T^2 KL(teacher || student) + hidden_weight * hidden``:
the task loss is the model's own (next-token, cross-entropy), the KL is taken on the logits softened by the
temperature ``T`` (Hinton et al. 2015; ``T^2`` keeps its gradients on the task loss's scale), and the hidden-state
term compares the outputs of the chosen student blocks with those of the teacher blocks they came from. With
``kd_weight`` and ``hidden_weight`` both 0 (the defaults) nothing is distilled and no teacher is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from ..checks import check_dataclass
from ..config import check_device, refuse_unused, setting
from ..errors import PrunekitError

HIDDEN_LOSSES = ("mse", "cosine")


@dataclass(frozen=True)
class Distillation:
    """What the student learns from the teacher, and how much of each term; checked when made."""

    teacher: str | None = setting(
        None,
        "distillation teacher: a checkpoint (path, hub id, timm:/local-dir: source) with the student's vocabulary or "
        "classes (default: a frozen copy of the model the run started from, before pruning)",
        example="org/dense-model",
        example_with={"kd_weight": 1.0},
    )
    teacher_device: str | None = setting(
        None,
        "where the teacher runs (default: the student's device); cpu keeps it off the GPU, its forward then runs "
        "on the CPU",
        example="cpu",
        example_with={"kd_weight": 1.0},
    )
    task_loss_weight: float = setting(
        1.0,
        "weight of the model's own loss (next-token, cross-entropy) beside the distillation terms",
        type=float,
        example=0.5,
        example_with={"kd_weight": 1.0},
    )
    kd_weight: float = setting(
        0.0, "weight of T^2 KL(teacher || student) on the logits; 0 = no logit distillation", type=float, example=1.0
    )
    kd_temperature: float = setting(
        1.0,
        "temperature T that softens both distributions in the KL term",
        type=float,
        example=2.0,
        example_with={"kd_weight": 1.0},
    )
    hidden_weight: float = setting(
        0.0, "weight of the hidden-state loss on the outputs of the chosen blocks; 0 = none", type=float, example=0.1
    )
    hidden_loss: str = setting(
        "mse",
        "mse (normalised per block by the teacher output's mean square) or cosine (1 - cos per token)",
        example="cosine",
        example_with={"hidden_weight": 0.1},
    )
    hidden_layers: tuple[int, ...] = setting(
        (),
        "student blocks whose outputs match the teacher's (default: all); after depth pruning block i matches the "
        "teacher block it came from",
        repeat=True,
        example=(0,),
        example_with={"hidden_weight": 0.1},
    )

    def __post_init__(self) -> None:
        normalise_layers(self)
        check_dataclass(self, "distillation setting")
        check_distillation(self)

    @classmethod
    def of(cls, source: Any) -> Distillation:
        """The distillation fields of ``source`` (a ``FinetuneRecipe``, or any object with them)."""
        return cls(**{f.name: getattr(source, f.name) for f in fields(cls)})

    @property
    def active(self) -> bool:
        """Whether anything is distilled (then a teacher runs beside the student)."""
        return self.kd_weight > 0 or self.hidden_weight > 0


def normalise_layers(obj: Any) -> None:
    """``hidden_layers`` as a tuple: YAML gives a list, the CLI strings, a user one index."""
    value = obj.hidden_layers
    value = (value,) if isinstance(value, (int, str)) else tuple(value or ())
    value = tuple(int(v) if isinstance(v, str) and v.strip().lstrip("-").isdigit() else v for v in value)
    object.__setattr__(obj, "hidden_layers", value)


def check_distillation(d: Distillation) -> None:
    """Values and combinations; a setting that would be ignored is refused (one line naming it)."""
    for name in ("task_loss_weight", "kd_weight", "hidden_weight"):
        value = getattr(d, name)
        if not (math.isfinite(value) and value >= 0):
            raise PrunekitError(f"{name} must be a finite number >= 0, got {value}")
    if not (math.isfinite(d.kd_temperature) and d.kd_temperature > 0):
        raise PrunekitError(f"kd_temperature must be a finite number > 0, got {d.kd_temperature}")
    if d.hidden_loss not in HIDDEN_LOSSES:
        raise PrunekitError(f"unknown hidden_loss {d.hidden_loss!r}; choose from {', '.join(HIDDEN_LOSSES)}")
    if any(i < 0 for i in d.hidden_layers) or len(set(d.hidden_layers)) != len(d.hidden_layers):
        raise PrunekitError(f"hidden_layers must be distinct block indices >= 0, got {list(d.hidden_layers)}")
    try:
        check_device(d.teacher_device)
    except PrunekitError as err:
        raise PrunekitError(f"teacher_device: {err}".replace("--device", "teacher_device")) from None
    if not d.active:
        refuse_unused(d, (), "training without distillation", "kd_weight and hidden_weight are 0 (set one to distil)")
        return
    if d.kd_weight == 0:
        refuse_unused(d, _all_but("kd_temperature"), "distillation without kd_weight", "there is no logit term")
    if d.hidden_weight == 0:
        refuse_unused(
            d, _all_but("hidden_loss", "hidden_layers"), "distillation without hidden_weight", "there is no hidden term"
        )


def _all_but(*names: str) -> set[str]:
    return {f.name for f in fields(Distillation)} - set(names)
