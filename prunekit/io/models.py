"""``prunekit.save`` / ``prunekit.load``: one pair for every model prunekit prunes, the format picked by the
model (Hugging Face ``save_pretrained`` for transformers models, timm / torchvision for image models)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import PrunekitError
from ..graph import is_hf_model


def save(model: nn.Module, out: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write ``model`` (and ``tokenizer``) into the directory ``out`` atomically; ``load(out)`` reads it back."""
    from .atomic import atomic_dir
    from .hf import save_causal_lm
    from .timm import save_vision_model

    out = Path(out)
    with atomic_dir(out) as tmp:
        if is_hf_model(model):
            save_causal_lm(model, tokenizer, tmp)
        else:
            save_vision_model(model, tmp)
    return out


def load(path: str | os.PathLike, dtype: str | None = None, trust_remote_code: bool = False) -> nn.Module:
    """A model saved by ``save`` or ``prunekit prune`` (dense or compact), in eval mode, as the class its config's
    ``architectures`` names (a masked LM, a seq2seq or vision-language model, not only causal LMs)."""
    from ..model_classes import resolve_model_class
    from .hf import load_config, load_hf_model
    from .timm import is_vision_source, load_vision_model

    path = Path(path).expanduser()
    if not path.is_dir():
        raise PrunekitError(f"{str(path)!r} is not a saved model directory")
    if is_vision_source(path):
        return load_vision_model(path)
    model_class = resolve_model_class(load_config(path, trust_remote_code), source=str(path))
    return load_hf_model(path, model_class, dtype, trust_remote_code)
