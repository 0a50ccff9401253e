"""``prunekit.save`` / ``prunekit.load``: one pair for every model prunekit prunes, the format picked by the
model (Hugging Face ``save_pretrained`` for transformers models, timm / torchvision for image models)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..config import check_save_format
from ..errors import PrunekitError
from ..graph import is_hf_model


def save(model: nn.Module, out: str | os.PathLike, tokenizer: Any = None, save_format: str = "dense") -> Path:
    """Write ``model`` (and its ``tokenizer`` or processor, which ``prunekit eval`` and ``from_pretrained`` users
    need) into the directory ``out`` atomically; ``load(out)`` reads it back."""
    from .atomic import atomic_dir

    check_save_format(save_format)
    out = Path(out)
    with atomic_dir(out) as tmp:
        write_model(model, tmp, tokenizer, save_format)
    return out


def write_model(model: nn.Module, out_dir: str | os.PathLike, preprocessor: Any = None, save_format: str = "dense"):
    """The one way prunekit writes a model into a (staging) directory, for every front end: Hugging Face models
    with ``save_pretrained`` (``dense``) or in the compact sparse format with their config, generation config and a
    README saying how to load it (``compact``), plus their tokenizer or processor; timm and torchvision models in
    their own format (compact is refused for them)."""
    from .compact import save_compact, write_notice
    from .timm import save_vision_model

    if not is_hf_model(model):
        if save_format != "dense":
            raise PrunekitError(f"save_format {save_format!r} is for Hugging Face models; save image models dense")
        save_vision_model(model, out_dir)
        return
    if save_format == "compact":
        model.config.save_pretrained(str(out_dir))
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(str(out_dir))
        save_compact(model, out_dir)
        write_notice(out_dir)
    else:
        model.save_pretrained(str(out_dir), safe_serialization=True)
    if preprocessor is not None:
        preprocessor.save_pretrained(str(out_dir))


def load(path: str | os.PathLike, dtype: str | None = None, trust_remote_code: bool = False) -> nn.Module:
    """A model saved by ``save`` or ``prunekit prune`` (dense or compact), in eval mode, as the class its config's
    ``architectures`` names (a masked LM, a seq2seq or vision-language model, not only causal LMs)."""
    from ..model_classes import MODEL_CLASSES, resolve_model_class
    from .hf import load_config, load_hf_model
    from .timm import is_vision_source, load_vision_model

    path = Path(path).expanduser()
    if not path.is_dir():
        raise PrunekitError(f"{str(path)!r} is not a saved model directory")
    if is_vision_source(path):
        return load_vision_model(path)
    model_class = resolve_model_class(load_config(path, trust_remote_code), source=str(path))
    return load_hf_model(path, MODEL_CLASSES[model_class].auto_class, dtype, trust_remote_code)
