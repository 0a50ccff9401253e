"""Model classes: what a checkpoint loads as, what it is calibrated on and how it is evaluated, one row per class.

Each family file holds its rows (``ModelClass``: recognition, data, metric) and the functions they name:

* ``text.py``: ``causal-lm``, ``masked-lm``, ``encoder``, ``sequence-classification``, ``seq2seq``;
* ``vision.py``: ``image-classification``, ``vision-encoder``, and ``timm`` (timm / torchvision classifiers);
* ``multimodal.py``: ``image-text-to-text`` (vision-language models), ``dual-encoder`` (CLIP, SigLIP);
* ``speech.py``: ``speech-seq2seq`` (Whisper), ``audio-encoder`` (wav2vec 2.0).

A new class is one row (and its functions) in one of them. A Hugging Face checkpoint's class is read from
``architectures`` in its config.json before any weights load (``resolve_model_class``), or chosen with
``--model-class``: a name transformers lists in a row's auto mapping, then the auto classes a remote-code config
maps, then the class-name ending; the loaded class must read the inputs the row's data gives (a Whisper is not a
text encoder), and a name listed under several classes takes the lowest ``rank`` (most specific first: LLaVA is
also a "pretraining" model, CLIP also a bare ``AutoModel``).

Imports nothing heavy at import time: the recipe reads the table to offer ``--model-class``.
"""

from __future__ import annotations

from typing import Any

from ..errors import PrunekitError
from ..registry import Registry
from . import multimodal, speech, text, vision
from .base import Job, ModelClass, Prepared

AUTO = "auto"
TIMM = "timm"

_REGISTRY: Registry[ModelClass] = Registry("model class")  # a name registered twice is an error
ROWS = (*text.ROWS, *vision.ROWS, *multimodal.ROWS, *speech.ROWS)
for _row in ROWS:
    _REGISTRY.register(_row)

# Every row, family by family; the Hugging Face ones can be named with --model-class.
MODEL_CLASSES: dict[str, ModelClass] = {row.name: row for row in ROWS}
HF_CLASSES: dict[str, ModelClass] = {n: row for n, row in MODEL_CLASSES.items() if row.transformers}
PREFERENCE = sorted(HF_CLASSES.values(), key=lambda row: row.rank)  # most specific first
TEXT_CLASSES = frozenset(row.name for row in text.ROWS)  # calibrated on token windows of --seqlen tokens
CHOICES = (AUTO, *HF_CLASSES)
OVERRIDE_HINT = f"pass --model-class ({'|'.join(HF_CLASSES)}), or model_class: in the recipe"

__all__ = [
    "AUTO",
    "CHOICES",
    "HF_CLASSES",
    "MODEL_CLASSES",
    "TEXT_CLASSES",
    "TIMM",
    "Job",
    "ModelClass",
    "Prepared",
    "check_choice",
    "check_loadable",
    "class_of_architecture",
    "loadable_classes",
    "resolve_model_class",
]


def check_choice(name: str) -> None:
    if name not in CHOICES:
        raise PrunekitError(f"unknown model_class {name!r}; choose from {', '.join(CHOICES)}")


def _mapping(name: str) -> dict[str, Any]:
    from transformers.models.auto import modeling_auto

    return getattr(modeling_auto, name)


def _names(value: Any) -> tuple[str, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def class_names(model_class: str) -> set[str]:
    """Every ``transformers`` class name that the auto mapping of ``model_class`` lists."""
    return {n for value in _mapping(MODEL_CLASSES[model_class].mapping).values() for n in _names(value)}


def reads_its_inputs(row: ModelClass, class_name: str | None) -> bool:
    """Whether the transformers class ``class_name`` reads what ``row``'s data gives it (its ``main_input_name``);
    a class transformers does not have (remote code) is taken on trust."""
    import transformers

    cls = getattr(transformers, class_name, None) if class_name else None
    main = getattr(cls, "main_input_name", None)
    return not isinstance(main, str) or main in row.inputs


def class_of_architecture(architecture: str, auto_map: dict[str, Any]) -> str | None:
    """The model class of one ``architectures`` entry: a name transformers lists, then the auto classes a
    remote-code config maps (``auto_map``), then the class-name ending; None when none says."""
    rows = PREFERENCE
    for rule in (
        lambda r: architecture in class_names(r.name) and reads_its_inputs(r, architecture),
        lambda r: r.auto_class in auto_map,
        lambda r: architecture.endswith(r.suffixes or ("\0",)) and reads_its_inputs(r, architecture),
    ):
        found = next((r.name for r in rows if rule(r)), None)
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


def loaded_class(config: Any, model_class: str) -> str | None:
    """The transformers class name ``model_class``'s auto class builds for ``config``'s model type (None: none).
    ``AutoModel`` builds what ``MODEL_MAPPING_NAMES`` lists, whichever mapping recognises the row (vision and audio
    encoders are told from text encoders by the inputs their class reads)."""
    row = MODEL_CLASSES[model_class]
    mapping = _mapping("MODEL_MAPPING_NAMES" if row.auto_class == "AutoModel" else row.mapping)
    value = mapping.get(getattr(config, "model_type", None))
    return _names(value)[0] if value else None


def loadable_classes(config: Any) -> list[str]:
    """The model classes whose auto class builds ``config``'s model type into a model reading the row's inputs
    (remote code: whose auto class its ``auto_map`` names)."""
    auto_map = getattr(config, "auto_map", None) or {}
    found = []
    for name, row in HF_CLASSES.items():
        built = loaded_class(config, name)
        if row.auto_class in auto_map or (built is not None and reads_its_inputs(row, built)):
            found.append(name)
    return found


def check_loadable(config: Any, model_class: str, source: str = "") -> None:
    """A class that cannot build this model type, or builds one that reads other inputs than its data gives (a
    Whisper as a text encoder), fails here, from config.json, before any weights load."""
    possible = loadable_classes(config)
    if model_class in possible:
        return
    kind = getattr(config, "model_type", None) or type(config).__name__
    built = loaded_class(config, model_class)
    reads = ""
    if built is not None:
        import transformers

        main = getattr(getattr(transformers, built, None), "main_input_name", "?")
        reads = f" (its {built} reads {main}, not the {' or '.join(MODEL_CLASSES[model_class].inputs)} its data gives)"
    hint = f"choose one of {', '.join(possible)}" if possible else "prunekit cannot load it as a Hugging Face model"
    raise PrunekitError(
        f"model {source!r} is a {kind!r} model, which --model-class {model_class} cannot load{reads}; {hint}"
    )


def model_class_of(recipe: Any, config: Any = None) -> ModelClass:
    """The row a run uses: ``timm`` for timm / torchvision sources, else the Hugging Face class of ``config``."""
    from ..io.timm import is_vision_source

    if is_vision_source(recipe.model):
        return MODEL_CLASSES[TIMM]
    return MODEL_CLASSES[resolve_model_class(config, recipe.model_class, recipe.model)]
