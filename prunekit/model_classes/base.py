"""The row type of the model-class table, and what a run prepares with a row.

A ``ModelClass`` says how a checkpoint is recognised (the ``transformers`` auto class and mapping that list it, the
class-name endings of remote code), what its data is (calibration batches, evaluation data) and its metric. The
functions a row names take a ``Job``: the recipe, config.json and the checkpoint's tokenizer or processor, all had
before the weights load, so bad data costs seconds, not a model load.

Imports nothing heavy: the recipe reads the table to offer ``--model-class``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


# A ``prunekit.recipe.PruneRecipe``: the recipe module reads this table, so it is not imported here.
Recipe = Any


@dataclass
class Job:
    """One run: its model class and recipe, the checkpoint's config.json and preprocessor (tokenizer, processor,
    image processor or feature extractor), and the model once loaded (timm models: loaded first, since their
    preprocessing lives in the model)."""

    model_class: ModelClass
    recipe: Recipe
    config: Any = None
    preprocessor: Any = None
    model: nn.Module | None = None


@dataclass
class Prepared:
    """Evaluation data prepared before the weights load, its labels, and the dense model's outputs once the first
    evaluation has run (metrics against the dense model report nothing for that first run)."""

    model_class: str
    eval_data: Any = None
    labels: torch.Tensor | None = None
    reference: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


Loader = Callable[[Job], "nn.Module"]
Data = Callable[[Job], Any]
Prepare = Callable[[Job], Prepared]
Score = Callable[["nn.Module", Prepared, Recipe], dict]


@dataclass(frozen=True)
class ModelClass:
    """One kind of model prunekit loads, calibrates and evaluates in its own way: one row of the table."""

    name: str
    what: str  # for --help and errors
    data: str  # what --calib-data and --eval-data take
    metric: str  # the report key(s) of its metric
    rank: int  # when one architecture is listed under several classes, the lowest rank wins (most specific first)
    calibration: Data  # the calibration batches ``prunekit.prune`` takes
    prepare: Prepare  # the evaluation data
    score: Score  # the metric of a model on the prepared data
    preprocessor: Callable[[str, bool], Any] | None = None  # (source, trust_remote_code) -> tokenizer / processor
    load: Loader | None = None  # None: ``load_hf_model`` with the auto class
    auto_class: str | None = None  # the transformers auto class that loads it; None: not a transformers model
    mapping: str | None = None  # transformers.models.auto.modeling_auto.<mapping>: model type -> class name(s)
    suffixes: tuple[str, ...] = ()  # class-name endings for architectures no mapping lists (remote code)
    inputs: tuple[str, ...] = ()  # what its data feeds the model: the loaded class must read one of these
    holdout: str | None = None  # "text" / "images": a quality search without --eval-data holds out calibration data

    @property
    def transformers(self) -> bool:
        """Whether ``--model-class`` can name it (a Hugging Face class, loaded with its auto class)."""
        return self.auto_class is not None


def against_reference(prepared: Prepared, current: Any, key: str, compare: Callable[[Any, Any], float]) -> dict:
    """The first evaluation (the dense model) becomes the reference; later ones are compared with it."""
    if prepared.reference is None:
        prepared.reference = current
        return {}
    return {key: compare(prepared.reference, current)}
