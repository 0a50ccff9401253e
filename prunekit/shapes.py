"""Checkpoints whose layer sizes their config cannot state, and how prunekit loads them.

SliceGPT narrows the residual stream. LLaMA-style classes read the attention width from ``head_dim``, so a smaller
``hidden_size`` describes the sliced model; GPT-2, OPT, Falcon and GPT-NeoX size their attention from
``hidden_size`` itself, so no value of it does. Their sliced checkpoints keep the original ``hidden_size`` (the
attention width) and record the residual width under ``prunekit_residual_width``: ``prunekit.load`` (and every
prunekit command) builds the model from the config, gives each layer whose stored tensors are smaller their shapes,
then reads the weights. ``from_pretrained`` refuses such a checkpoint with a size mismatch; it never loads it wrong.

Width pruning of a layer range (``width layers=1-2``) leaves blocks of different sizes, while the config holds one
``num_attention_heads`` / ``intermediate_size`` for all of them: the config keeps the unpruned blocks' sizes and
``prunekit_layer_sizes`` lists, per block, the entries where that block differs. It loads the same way.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import PrunekitError
from .graph import HFConv1D

RESIDUAL_WIDTH = "prunekit_residual_width"
LAYER_SIZES = "prunekit_layer_sizes"


def _says(get) -> bool:
    """Whether a config's entries (``get(key)``) mark it sized by its weights: a residual width, or a per-block
    size record with at least one block that differs."""
    return get(RESIDUAL_WIDTH) is not None or any(get(LAYER_SIZES) or [])


def sized_by_weights(config) -> bool:
    """Whether a config (an HF config object, or one of its sub-configs: a LLaVA's text_config) says its layers
    take their sizes from the stored weights."""
    subs = [getattr(config, name, None) for name in getattr(config, "sub_configs", None) or {}]
    return any(_says(lambda key, c=c: getattr(c, key, None)) for c in [config, *subs] if c is not None)


def checkpoint_sized_by_weights(folder: str | os.PathLike) -> bool:
    """``sized_by_weights`` for a checkpoint directory, read from its config.json without loading anything."""
    config = Path(folder) / "config.json"
    try:
        found = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(found, dict):
        return False
    return any(_says(c.get) for c in [found, *found.values()] if isinstance(c, dict))


# The attributes that state a layer's size, set from its weight's shape ([out, in] for Linear, [in, out] for Conv1D).
_SIZE_ATTRIBUTES: dict[type, tuple[str, ...]] = {
    nn.Linear: ("out_features", "in_features"),
    HFConv1D: ("nx", "nf"),
    nn.Embedding: ("num_embeddings", "embedding_dim"),
}


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)))


def _resize(name: str, module: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Give ``module``'s tensors ``shapes`` (uninitialised) and its size attributes the matching values."""
    kind = next((k for k in _SIZE_ATTRIBUTES if isinstance(module, k)), None)
    one_dimensional = all(len(shape) == 1 for shape in shapes.values())
    if kind is None and not (isinstance(module, nn.LayerNorm) or one_dimensional):
        raise PrunekitError(
            f"{name}: cannot give {type(module).__name__} the sizes its stored weights have; the checkpoint and "
            "this transformers version disagree"
        )
    for key, shape in shapes.items():
        old = getattr(module, key)
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            setattr(module, key, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            module.register_buffer(key, new)
    weight = getattr(module, "weight", None)
    if kind is not None and weight is not None:
        for attribute, size in zip(_SIZE_ATTRIBUTES[kind], weight.shape):
            setattr(module, attribute, size)
    if isinstance(module, nn.LayerNorm) and weight is not None:
        module.normalized_shape = tuple(weight.shape)


def resize_to(model: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Give every layer of ``model`` whose tensors differ in shape from ``shapes`` (state-dict name -> shape) those
    shapes, in place; the resized tensors are uninitialised, so load the weights next. Where the config records
    blocks of different sizes, follow with ``structured.layer_sizes.commit_sizes`` (the blocks' own size
    attributes)."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        changed = {
            key: tuple(shapes[prefix + key])
            for key, tensor in _tensors(module).items()
            if prefix + key in shapes and tuple(tensor.shape) != tuple(shapes[prefix + key])
        }
        if changed:
            _resize(name or type(model).__name__, module, changed)
