"""When pruning happens while training: once, gradually on a cubic schedule (Zhu & Gupta 2017), or never
(the zeros the model already has are held). One ``Schedule`` serves ``PruningCallback`` and ``FinetuneRecipe``
(whose recipe keys are its fields), so its defaults and checks live here only."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .checks import check_dataclass
from .config import setting
from .errors import PrunekitError

SCHEDULES = ("oneshot", "cubic", "fixed")

# What the callback honours; every other prune setting given to it is refused (``_check_used``).
CALLBACK_USES = frozenset(
    {
        "method",
        "method_params",
        "update",
        "update_params",
        "sparsity",
        "pattern",
        "group",
        "include",
        "exclude",
        "layer_types",
        "stats_dtype",
        "expert_tokens",
        "kernels",
        "sequential",  # the callback always calibrates in one pass: sequential=False is what it does
    }
)
# "fixed" prunes nothing: it only needs to know which layers hold the zeros.
FIXED_USES = frozenset({"method", "include", "exclude", "layer_types"})
CALLBACK_CALIBRATION = (
    "each pruning event calibrates on the last calib_batches training batches, in one pass over the live model "
    "where Lightning placed it, every selected layer to the same target"
)


@dataclass(frozen=True)
class Schedule:
    """``oneshot`` prunes to the target at ``start_step``; ``cubic`` raises the sparsity from ``initial_sparsity``
    at ``start_step`` to the target at ``end_step``, re-scoring every ``every_n_steps`` on the ``calib_batches``
    training batches seen just before; ``fixed`` holds the zeros the model already has."""

    schedule: str = setting(
        "oneshot",
        "oneshot: prune, then train with the masks held; cubic: prune gradually while training",
        example="cubic",
        example_with={"end_step": 8},
    )
    start_step: int = setting(0, "training step of the (first) pruning event", type=int, example=2)
    end_step: int | None = setting(None, "cubic: the step the target sparsity is reached", type=int, example=8)
    every_n_steps: int = setting(100, "cubic: steps between pruning events", type=int, example=3)
    initial_sparsity: float = setting(0.0, "cubic: sparsity of the first event", type=float, example=0.1)
    calib_batches: int = setting(16, "training batches each pruning event calibrates on", type=int, example=2)

    def __post_init__(self) -> None:
        check_dataclass(self, "schedule")
        if self.schedule not in SCHEDULES:
            raise PrunekitError(f"unknown pruning schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.start_step < 0 or self.calib_batches < 1:
            raise PrunekitError(
                f"start_step must be >= 0 and calib_batches >= 1, got {self.start_step} and {self.calib_batches}"
            )
        if self.every_n_steps < 1:
            raise PrunekitError(f"every_n_steps must be >= 1, got {self.every_n_steps}")
        if self.end_step is not None and self.end_step < 0:
            raise PrunekitError(f"end_step must be >= 0, got {self.end_step}")
        if not 0 <= self.initial_sparsity < 1:
            raise PrunekitError(f"initial_sparsity must be in [0, 1), got {self.initial_sparsity}")
        if self.schedule == "cubic" and (self.end_step is None or self.end_step <= self.start_step):
            raise PrunekitError(
                f"the cubic schedule needs end_step > start_step, got start_step={self.start_step}, "
                f"end_step={self.end_step}"
            )

    @classmethod
    def of(cls, source: Any) -> Schedule:
        """The schedule fields of ``source`` (a ``FinetuneRecipe``, or any object with them) as a ``Schedule``."""
        return cls(**{f.name: getattr(source, f.name) for f in fields(cls)})

    def check_target(self, sparsity: float, pattern: str | None) -> None:
        """What depends on the prune settings: a cubic schedule grows toward ``sparsity`` without a pattern."""
        if self.schedule != "cubic":
            return
        if pattern is not None:
            raise PrunekitError(
                "N:M patterns fix the sparsity of every group, so they cannot grow gradually; use "
                "schedule='oneshot' with a pattern"
            )
        if not self.initial_sparsity < sparsity:
            raise PrunekitError(
                f"initial_sparsity must be below the target sparsity, got {self.initial_sparsity} with sparsity "
                f"{sparsity}"
            )

    def events(self, sparsity: float) -> list[tuple[int, float]]:
        """The ``(step, sparsity)`` pruning events, in step order; the last one reaches ``sparsity``."""
        if self.schedule == "fixed":
            return []
        if self.schedule == "oneshot":
            return [(self.start_step, sparsity)]
        start, end = self.start_step, self.end_step
        steps = sorted(set(range(start, end, self.every_n_steps)) | {end})
        events = [(t, cubic_sparsity(t, sparsity, self.initial_sparsity, start, end)) for t in steps]
        return [(t, s) for t, s in events if s > 0]


def cubic_sparsity(step: int, final: float, initial: float = 0.0, start: int = 0, end: int = 1) -> float:
    """Zhu & Gupta: ``s_t = s_f + (s_i - s_f)(1 - (t - t0) / (n dt))^3``, flat outside ``[start, end]``.

    At ``step >= end`` the result is exactly ``final`` (the cubic term is exactly zero there).
    """
    if end <= start:
        return final if step >= start else initial
    frac = min(max((step - start) / (end - start), 0.0), 1.0)
    return final + (initial - final) * (1.0 - frac) ** 3
