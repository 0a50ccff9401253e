"""Which Hugging Face model class a checkpoint loads as: read from ``architectures`` in its config.json before any
weights load, or chosen with ``--model-class``.

One row per class: the ``transformers`` auto class that loads it, the auto mapping whose class names identify it,
and the class-name endings that identify remote-code architectures the mappings cannot know. A name listed in
several mappings (LLaVA is also a "pretraining" model, BART also a masked LM) takes the first class in
``PREFERENCE``. This module imports nothing heavy at import time: the recipe uses it to check ``model_class``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import PrunekitError

AUTO = "auto"


@dataclass(frozen=True)
class ModelClass:
    """A kind of Hugging Face model prunekit loads, calibrates and evaluates in its own way."""

    name: str
    auto_class: str  # the transformers auto class that loads it
    mapping: str  # transformers.models.auto.modeling_auto.<mapping>: model type -> class name(s)
    suffixes: tuple[str, ...]  # class-name endings for architectures no mapping lists (remote code)
    what: str  # for --help and errors


MODEL_CLASSES: dict[str, ModelClass] = {
    c.name: c
    for c in (
        ModelClass(
            "causal-lm",
            "AutoModelForCausalLM",
            "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
            ("ForCausalLM", "LMHeadModel"),
            "*ForCausalLM decoders",
        ),
        ModelClass(
            "masked-lm", "AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", ("ForMaskedLM",), "*ForMaskedLM"
        ),
        ModelClass(
            "encoder", "AutoModel", "MODEL_MAPPING_NAMES", ("Model",), "bare *Model encoders, hidden states only"
        ),
        ModelClass(
            "sequence-classification",
            "AutoModelForSequenceClassification",
            "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
            ("ForSequenceClassification",),
            "*ForSequenceClassification",
        ),
        ModelClass(
            "seq2seq",
            "AutoModelForSeq2SeqLM",
            "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
            (),
            "encoder-decoders such as T5, BART",
        ),
        ModelClass(
            "image-text-to-text",
            "AutoModelForImageTextToText",
            "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
            (),
            "LLaVA-style vision-language models",
        ),
    )
}
CHOICES = (AUTO, *MODEL_CLASSES)
# Most specific first: a vision-language model is also listed as a causal LM, an encoder-decoder as a masked LM.
PREFERENCE = ("image-text-to-text", "seq2seq", "causal-lm", "sequence-classification", "masked-lm", "encoder")
OVERRIDE_HINT = f"pass --model-class ({'|'.join(MODEL_CLASSES)}), or model_class: in the recipe"


def check_choice(name: str) -> None:
    if name not in CHOICES:
        raise PrunekitError(f"unknown model_class {name!r}; choose from {', '.join(CHOICES)}")


def class_names(model_class: str) -> set[str]:
    """Every ``transformers`` class name that the auto mapping of ``model_class`` lists."""
    from transformers.models.auto import modeling_auto

    names = getattr(modeling_auto, MODEL_CLASSES[model_class].mapping)
    return {n for value in names.values() for n in (value if isinstance(value, (list, tuple)) else (value,))}


def class_of_architecture(architecture: str, auto_map: dict[str, Any]) -> str | None:
    """The model class of one ``architectures`` entry: a name transformers lists, then the auto classes a
    remote-code config maps (``auto_map``), then the class-name ending; None when none says."""
    for rule in (
        lambda c: architecture in class_names(c),
        lambda c: MODEL_CLASSES[c].auto_class in auto_map,
        lambda c: architecture.endswith(MODEL_CLASSES[c].suffixes),
    ):
        found = next((c for c in PREFERENCE if rule(c)), None)
        if found is not None:
            return found
    return None


def resolve_model_class(config: Any, requested: str = AUTO, source: str = "") -> str:
    """The model class to load ``source`` as: ``requested``, or the one its ``architectures`` names. The class must
    be able to load the config's model type; else, or when nothing fits, one line naming it and the override."""
    check_choice(requested)
    if requested != AUTO:
        check_loadable(config, requested, source)
        return requested
    architectures = list(getattr(config, "architectures", None) or [])
    auto_map = getattr(config, "auto_map", None) or {}
    for architecture in architectures:
        found = class_of_architecture(architecture, auto_map)
        if found is not None:
            check_loadable(config, found, source)
            return found
    named = f"architecture {', '.join(architectures)}" if architectures else "config.json names no architectures"
    raise PrunekitError(f"model {source!r}: {named} is not a model class prunekit loads; {OVERRIDE_HINT}")


def loadable_classes(config: Any) -> list[str]:
    """The model classes whose auto mapping lists ``config``'s model type (remote code: whose auto class its
    ``auto_map`` names)."""
    from transformers.models.auto import modeling_auto

    auto_map = getattr(config, "auto_map", None) or {}
    model_type = getattr(config, "model_type", None)
    return [
        name
        for name, row in MODEL_CLASSES.items()
        if model_type in getattr(modeling_auto, row.mapping) or row.auto_class in auto_map
    ]


def check_loadable(config: Any, model_class: str, source: str = "") -> None:
    """A class that cannot build this model type fails here, from config.json, before any weights load."""
    possible = loadable_classes(config)
    if model_class != "image-text-to-text" and model_class in possible and not has_vocabulary(config):
        raise PrunekitError(
            f"model {source!r} has no vocabulary in its config.json, so it is not a text model that --model-class "
            f"{model_class} calibrates on text; image classifiers load as timm:NAME, local-dir:PATH or torchvision:NAME"
        )
    if model_class not in possible:
        kind = getattr(config, "model_type", None) or type(config).__name__
        hint = f"choose one of {', '.join(possible)}" if possible else "prunekit cannot load it as a Hugging Face model"
        raise PrunekitError(
            f"model {source!r} is a {kind!r} model, which --model-class {model_class} cannot load; {hint}"
        )


def has_vocabulary(config: Any) -> bool:
    """Text models say how many tokens they embed; vision encoders (ViT, CLIP's vision tower) do not."""
    return isinstance(getattr(config, "vocab_size", None), int)
