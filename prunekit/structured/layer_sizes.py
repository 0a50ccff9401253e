"""Blocks of different sizes in one Hugging Face model, recorded in ``config.json``.

A Hugging Face config holds one ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` for all
layers. When width pruning leaves blocks of different sizes (a layer range: LLM-Pruner keeps the first and last
blocks whole), the config's own entries keep the sizes of the largest (unpruned) blocks, and
``config.prunekit_layer_sizes`` lists per block the entries where that block differs (``{}`` for a block as the
config says). Its presence marks the checkpoint as sized by its weights (``prunekit.shapes``): ``prunekit.load``
(and every prunekit command) builds the model from the config and gives each layer the shapes of its stored
weights; plain ``from_pretrained`` stops at the first block whose shapes differ. Depth pruning keeps the list in
step with the blocks it keeps (``architectures.PER_LAYER_LISTS``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..graph import find_blocks
from ..shapes import LAYER_SIZES as KEY
from ..shapes import resize_to
from .common import block_config, mlp_size_key
from .coupling import find_groups

RELOAD_NOTE = (
    f"blocks differ in size (config.json {KEY}): reload with prunekit.load or any prunekit command; "
    "plain from_pretrained builds every block at the config's sizes"
)


def per_block_record(per_block: Sequence[Mapping[str, Any]]) -> tuple[dict, list[dict] | None]:
    """``(config values, record)``: when every block has the same values, those and no record; else the values
    of the largest blocks (every entry's maximum over the blocks: the unpruned sizes) and, per block, the
    entries where it differs from them."""
    first = dict(per_block[0])
    if all(dict(values) == first for values in per_block):
        return first, None
    keys = dict.fromkeys(k for values in per_block for k in values)  # in order: messages name them the same way
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


def commit_sizes(model) -> None:
    """After a model built from a config with a record took its stored weights' shapes (``prunekit.shapes``): set
    the module attributes that state a block's sizes (LLaMA's ``mlp.intermediate_size``, head counts where a module
    keeps them) from those shapes, as width pruning set them. Models without a record are left alone."""
    found = find_blocks(model)
    if found is None:
        return
    prefix, blocks = found
    record = getattr(block_config(model, prefix), KEY, None)
    for i, values in enumerate(record if isinstance(record, list) else []):
        if values and i < len(blocks):
            for group in find_groups(f"{prefix}.{i}", [blocks[i]], mlp_size_key(model)):
                group.commit(group.units)  # the layers have the stored shapes: their unit count is the kept one


def take_stored_sizes(model, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """A model built from a config sized by its weights (``prunekit.shapes``) given the stored tensors' shapes
    (state-dict name -> shape), and its blocks' size attributes after them: what loading such a checkpoint does
    before the weights go in."""
    resize_to(model, shapes)
    commit_sizes(model)
