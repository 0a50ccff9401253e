"""Depth pruning: remove the least important whole blocks (decoder layers, ViT blocks).

Importance of block ``i``, lower = removed first:

* ``cosine`` (ShortGPT's Block Influence): ``1 - mean cos(x_in, x_out)`` over calibration tokens; a block that
  barely turns the residual stream does little. One forward pass.
* ``ppl``: the increase of the mean next-token NLL on the calibration batches when block ``i`` alone is skipped.
  One forward pass per block (causal LMs only).

All ``k`` blocks are chosen from these one-shot scores. ``k = round(ratio * n_blocks)`` and at least one when
``ratio > 0``, so ``ratio`` is met to the nearest block; the report gives the fraction actually removed.
The config is kept consistent (``num_hidden_layers``, per-layer lists such as ``layer_types``, every
attention's ``layer_idx`` for the KV cache) so ``save_pretrained`` / ``from_pretrained`` round-trip.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PrunekitError
from ..forward import block_output, hidden_state, hooks
from .base import ModelMethod, register_structured
from .common import block_list, check_batches, check_ratio, count_params, forward, hf_config, input_ids, summary

log = logging.getLogger(__name__)

SCORES = ("cosine", "ppl")
# Config entries that hold one value per decoder layer and must lose the removed layers' entries.
PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers")


def blocks_to_remove(n_blocks: int, ratio: float) -> int:
    """Nearest whole number of blocks to ``ratio`` of them (half rounds up), at least one if ``ratio > 0``."""
    k = math.floor(ratio * n_blocks + 0.5)
    k = max(k, 1) if ratio > 0 else 0
    if k >= n_blocks:
        raise PrunekitError(f"removing {ratio:.0%} of {n_blocks} blocks would leave none; lower the ratio")
    return k


# ---------------------------------------------------------------- scores


@torch.no_grad()
def cosine_scores(model: nn.Module, blocks: Sequence[nn.Module], batches: Sequence) -> torch.Tensor:
    """``1 - mean cos(input, output)`` of each block's hidden states over all calibration tokens."""
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    counts = torch.zeros(len(blocks), dtype=torch.float64)

    def hook(i):
        def fn(module, args, kwargs, output):
            cos = F.cosine_similarity(hidden_state(args, kwargs).float(), block_output(output).float(), dim=-1)
            sums[i] += cos.double().sum().cpu()
            counts[i] += cos.numel()

        return fn

    with hooks(b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)):
        for batch in batches:
            forward(model, batch)
    return (1.0 - sums / counts.clamp_min(1)).float()


@torch.no_grad()
def causal_nll(model: nn.Module, batches: Sequence) -> float:
    """Mean next-token negative log-likelihood over the calibration batches."""
    total, count = 0.0, 0
    for batch in batches:
        ids = input_ids(batch)
        logits = forward(model, batch).logits[:, :-1].float()
        targets = ids[:, 1:].to(logits.device)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    return total / max(count, 1)


@contextmanager
def skipping(model: nn.Module, prefix: str, drop: Sequence[int]):
    """Temporarily run the model without the blocks in ``drop`` (no config or layer_idx changes)."""
    parent, attr, container = _container(model, prefix)
    setattr(parent, attr, _rebuilt(container, [b for i, b in enumerate(container) if i not in set(drop)]))
    try:
        yield
    finally:
        setattr(parent, attr, container)


@torch.no_grad()
def ppl_scores(model: nn.Module, prefix: str, n_blocks: int, batches: Sequence) -> torch.Tensor:
    """Increase of the calibration NLL when each block alone is skipped."""
    dense = causal_nll(model, batches)
    scores = []
    for i in range(n_blocks):
        with skipping(model, prefix, [i]):
            scores.append(causal_nll(model, batches) - dense)
    return torch.tensor(scores)


# ---------------------------------------------------------------- removal


def _container(model: nn.Module, prefix: str) -> tuple[nn.Module, str, nn.Module]:
    parent_name, _, attr = prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attr, getattr(parent, attr)


def _rebuilt(container: nn.Module, blocks: list[nn.Module]) -> nn.Module:
    return nn.Sequential(*blocks) if isinstance(container, nn.Sequential) else nn.ModuleList(blocks)


def _renumber(blocks: Sequence[nn.Module]) -> None:
    """Every module that knows its layer index (HF attention: ``layer_idx``, the KV-cache slot) gets the new one."""
    for i, block in enumerate(blocks):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = i


def _update_config(model: nn.Module, keep: Sequence[int], n_before: int) -> None:
    config = hf_config(model)
    if config is None:
        return
    for key in PER_LAYER_CONFIG_KEYS:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == n_before:
            setattr(config, key, type(values)(values[i] for i in keep))
    config.num_hidden_layers = len(keep)


def remove_blocks(model: nn.Module, prefix: str, drop: Sequence[int]) -> nn.Module:
    """Delete blocks ``drop`` from the block list at ``prefix``, keeping the config and layer indices consistent.
    Returns the new block list."""
    parent, attr, container = _container(model, prefix)
    keep = [i for i in range(len(container)) if i not in set(drop)]
    kept = _rebuilt(container, [container[i] for i in keep])
    setattr(parent, attr, kept)
    _renumber(kept)
    _update_config(model, keep, len(container))
    return kept


@register_structured
@dataclass
class Depth(ModelMethod):
    """Remove whole blocks, the least important first (``score``: ``cosine`` or ``ppl``)."""

    name: ClassVar[str] = "depth"
    score: str = "cosine"

    def __post_init__(self):
        if self.score not in SCORES:
            raise PrunekitError(f"unknown depth score {self.score!r}; choose from {', '.join(SCORES)}")

    def block_scores(self, model: nn.Module, prefix: str, blocks: nn.Module, batches: Sequence) -> torch.Tensor:
        if self.score == "cosine":
            return cosine_scores(model, list(blocks), batches)
        return ppl_scores(model, prefix, len(blocks), batches)

    def prune_model(self, model: nn.Module, batches: list, ratio: float) -> dict:
        ratio = check_ratio(ratio)
        check_batches(batches, self.name)
        prefix, blocks = block_list(model)
        k = blocks_to_remove(len(blocks), ratio)
        before, total_before = count_params(blocks), count_params(model)
        scores = self.block_scores(model, prefix, blocks, batches)
        drop = sorted(torch.argsort(scores, stable=True)[:k].tolist())
        kept = remove_blocks(model, prefix, drop)
        log.info("depth (%s): removed blocks %s of %d", self.score, drop, len(blocks))
        return summary(
            before,
            count_params(kept),
            total_before,
            count_params(model),
            score=self.score,
            blocks_before=len(blocks),
            removed_blocks=drop,
            block_scores=[round(float(s), 6) for s in scores],
        )
