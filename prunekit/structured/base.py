"""What a structured method is, and their registry (kept apart from the weight-zeroing methods)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..registry import Registry


@dataclass
class ModelMethod:
    """A method that changes the model's structure (removes blocks, heads, channels; rotates and slices)
    instead of zeroing weights layer by layer. ``prune_model`` gets the model and calibration batches,
    removes about ``ratio`` of the selected parameters, and returns a JSON-able summary for the report."""

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = True

    def prune_model(self, model, batches: list, ratio: float) -> dict:
        raise NotImplementedError


STRUCTURED: Registry[type[ModelMethod]] = Registry("structured method")
register_structured = STRUCTURED.register
