"""Blocks of different sizes in one Hugging Face model: recorded in ``config.json``, rebuilt when loading.

A Hugging Face config holds one ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` for all
layers, and ``from_pretrained`` builds every block from it. When width pruning leaves blocks of different sizes
(a layer range: LLM-Pruner keeps the first and last blocks whole), the config's own entries keep the sizes of
the blocks that were not pruned, and ``config.prunekit_layer_sizes`` lists per block the entries where that block
differs (``{}`` for a block as the config says). ``rebuild_blocks`` resizes a model freshly built from such a
config so that the checkpoint fits it: ``prunekit.load`` (and every prunekit command that loads a model) does
that; plain ``from_pretrained`` cannot and stops at the first block whose shapes differ.

The sizes are changed with the same coupled groups (``coupling``) the pruning cut, keeping the first units,
which is what a compact checkpoint of the pruned blocks holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..errors import PrunekitError

KEY = "prunekit_layer_sizes"
RELOAD_NOTE = (
    f"blocks differ in size (config.json {KEY}): reload with prunekit.load or any prunekit command; "
    "plain from_pretrained builds every block at the config's sizes"
)


def layer_sizes(config: Any) -> list[dict] | None:
    """The per-block size record of ``config`` (None when every block is as the config says)."""
    sizes = getattr(config, KEY, None) if config is not None else None
    return sizes if isinstance(sizes, list) and any(sizes) else None


def per_block_record(per_block: Sequence[Mapping[str, Any]]) -> tuple[dict, list[dict] | None]:
    """``(config values, record)``: when every block has the same values, those and no record; else the values
    of the largest blocks (every entry's maximum over the blocks: the unpruned sizes) and, per block, the
    entries where it differs from them."""
    first = dict(per_block[0])
    if all(dict(values) == first for values in per_block):
        return first, None
    keys = {k for values in per_block for k in values}
    top = {k: max(values[k] for values in per_block if k in values) for k in keys}
    return top, [{k: v for k, v in values.items() if top.get(k) != v} for values in per_block]


def set_record(config: Any, record: list[dict] | None) -> None:
    """Write the record into ``config`` (or remove a stale one when all blocks agree)."""
    if config is None:
        return
    if record is None:
        if hasattr(config, KEY):
            delattr(config, KEY)
        return
    setattr(config, KEY, [dict(values) for values in record])


def _kept_units(group, values: Mapping[str, Any]) -> int | None:
    """The unit count of ``group`` whose config entries match ``values`` (None: the group's entries are not in
    ``values``, so it keeps its size)."""
    own = group.config(group.units)
    if not any(k in values for k in own):
        return None
    for kept in range(group.units, 0, -1):
        implied = group.config(kept)
        if all(values.get(k, implied[k]) == implied[k] for k in implied if k in values):
            return kept
    raise PrunekitError(f"{group.name}: no size of its {group.kind} gives {dict(values)} from config.json {KEY}")


def rebuild_blocks(model: nn.Module) -> nn.Module:
    """Resize the blocks of a model built from a config with a ``prunekit_layer_sizes`` record to the sizes it
    lists (on whatever device the model is, meta included), in place; a model without one is returned as is."""
    import torch

    from .coupling import find_groups
    from .width import mlp_size_key

    found = _record_of(model)
    if found is None:
        return model
    prefix, blocks, record = found
    if len(record) != len(blocks):
        raise PrunekitError(f"config.json {KEY} lists {len(record)} blocks but the model has {len(blocks)}")
    for i, values in enumerate(record):
        if not values:
            continue
        groups = find_groups(f"{prefix}.{i}", [blocks[i]], mlp_size_key(model))
        matched = set()
        for group in groups:
            kept = _kept_units(group, values)
            if kept is not None and kept < group.units:
                group.cut(torch.arange(kept))
            matched |= set(group.config(group.units)) & set(values)
        unknown = set(values) - matched
        if unknown:
            raise PrunekitError(f"config.json {KEY}: block {i} sets {sorted(unknown)}, which no layer of it holds")
    return model


def resizing(cls: type) -> type:
    """A subclass of the model class ``cls`` that resizes its blocks as its config records right after building
    them, so ``from_pretrained`` (its key renaming, weight tying and dtype handling included) loads a checkpoint
    whose blocks differ in size. It adds nothing else: the loaded model's class can be set back to ``cls``."""

    class Resized(cls):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            rebuild_blocks(self)

    Resized.__name__, Resized.__qualname__, Resized.__module__ = cls.__name__, cls.__qualname__, cls.__module__
    return Resized


def _record_of(model: nn.Module) -> tuple[str, nn.Module, list[dict]] | None:
    from ..graph import find_blocks
    from .common import block_config

    if layer_sizes(getattr(model, "config", None)) is None and not _any_record(model):
        return None
    found = find_blocks(model)
    if found is None:
        return None
    prefix, blocks = found
    record = layer_sizes(block_config(model, prefix))
    return (prefix, blocks, record) if record is not None else None


def _any_record(model: nn.Module) -> bool:
    """A record in a sub-config (a LLaVA's text_config)."""
    config = getattr(model, "config", None)
    subs = getattr(config, "sub_configs", None) or {}
    return any(layer_sizes(getattr(config, name, None)) is not None for name in subs)
