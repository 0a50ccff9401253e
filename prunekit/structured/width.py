"""Width pruning: remove attention heads (whole KV groups under GQA) and MLP channels, with every coupled
row and column (see ``coupling``), so the result is a smaller dense model.

Importance of a unit (Wanda-sp, the structured Wanda of the FLAP paper): the sum over all of the unit's weights
of ``|W_ij| * ||X_j||``, ``X`` being the input of the layer the weight sits in (rows of q/k/v, gate/up, fc1
see the block's normalised hidden states; columns of o_proj/down_proj/fc2 see the attention output / the
MLP activations). ``score="magnitude"`` drops ``||X_j||`` (no calibration data).

How much goes: ``ratio`` is the fraction of the block list's parameters to remove. Every layer loses the
largest number of KV groups, at most ``head_ratio * units`` (``head_ratio`` defaults to ``ratio``), that leaves a
head count the model's config class accepts; MLP channels make up the rest of the parameter budget, again the
same count in every layer. Heads are coarse units, so they never overshoot; fine-grained channels land the total
near ``ratio``. (transformers 5's LlamaConfig requires ``hidden_size % num_attention_heads == 0`` when it saves
or loads, so a 256-wide model with 8 query heads in 4 KV groups can keep 4, 2 or 1 groups, not 3.)
Which heads/channels go is chosen per layer; how many is the same in every layer because a Hugging Face
LLaMA config has one ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` for all layers.
(Per-layer counts would need a config with per-layer lists and a model class that reads them; we keep
uniform counts so the result is a plain model of the same class.) ``head_dim`` is written into the config
explicitly, since ``hidden_size / num_attention_heads`` no longer gives it.

Heads go only where the layout allows (``coupling``): models whose ``head_dim`` is ``hidden_size / heads`` (GPT-2,
OPT, Falcon, GPT-NeoX, BERT) or whose q/k norm spans all heads (OLMo 2) lose MLP channels only, and an explicit
``head_ratio`` there is an error. Refused before any work: mixture-of-experts blocks (fused expert tensors) and
T5 (its two stacks share one config's sizes). Every cut is first rehearsed on a meta copy of the model and
checked against what the new config describes, so a model that would not reload is never produced.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..architectures import family
from ..collect import collect
from ..distributed import reduce_stats, together
from ..errors import PrunekitError
from ..graph import weight_matrix
from ..methods.wanda import wanda_score
from .base import ModelMethod, register_structured
from .common import (
    arch_name,
    block_config,
    block_list,
    check_batches,
    check_ratio,
    check_resizable,
    config_accepts,
    count_params,
    ensure_reloadable,
    forward,
    hf_config,
    meta_clone,
    set_config,
    summary,
)
from .coupling import Group, Slot, find_groups

log = logging.getLogger(__name__)
Accepts = Callable[[Mapping[str, Any]], bool]

SCORES = ("wanda", "magnitude")


def mlp_size_key(model: nn.Module) -> str | None:
    """The config entry that holds the MLP width (None without an HF config: timm models have none)."""
    return family(arch_name(model)).mlp_size if hf_config(model) is not None else None


# ---------------------------------------------------------------- scores


def slot_scores(slot: Slot, norms: torch.Tensor | None) -> torch.Tensor:
    """``sum |W_ij| * ||X_j||`` along each row (``dim=0``) or column (``dim=1``) of the slot's layer."""
    w = weight_matrix(slot.layer).detach().float()
    scores = w.abs() if norms is None else wanda_score(w, norms.to(w.device)[None, :])
    return scores.sum(dim=1 - slot.dim)


def unit_scores(group: Group, norms: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    """Importance of each unit of ``group``: its channels' scores summed over every coupled slot."""
    total = torch.zeros(group.units)
    for slot in group.slots:
        per_channel = slot_scores(slot, None if norms is None else norms[slot.name]).cpu()
        total += per_channel[slot.index].sum(dim=1)
    return total


@torch.no_grad()
def input_norms(model: nn.Module, groups: Sequence[Group], batches: Sequence) -> dict[str, torch.Tensor]:
    """``||X_j||`` of every slot layer's input columns on the dense model (one calibration pass, every rank's)."""
    layers = {slot.name: slot.layer for g in groups for slot in g.slots}
    with together():
        with collect(layers) as stats:
            for batch in batches:
                forward(model, batch)
        stats = {name: stats[name] for name in layers}
    reduce_stats(stats)
    return {name: stats[name].norms()[0] for name in layers}


# ---------------------------------------------------------------- how many units go


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def heads_to_remove(group: Group, fraction: float, accepts: Accepts = lambda values: True) -> int:
    """The most units, at most ``fraction`` of them, whose removal leaves a count the config accepts
    (LlamaConfig wants ``hidden_size % num_attention_heads == 0``). Heads are coarse units, so this never
    overshoots: MLP channels, which are fine-grained, take the rest of the budget."""
    if group.fixed:
        return 0
    most = min(math.floor(fraction * group.units + 1e-9), group.units - 1)
    return next(r for r in range(most, -1, -1) if r == 0 or accepts(group.config(group.units - r)))


def channels_to_remove(units: int, fraction: float, round_to: int) -> int:
    """Remove about ``fraction`` of ``units``, keeping a multiple of ``round_to`` (at least one multiple)."""
    kept = round_to * _round_half_up(units * (1.0 - fraction) / round_to)
    return units - min(max(kept, min(round_to, units)), units)


def removal_counts(
    groups: Sequence[Group],
    ratio: float,
    head_ratio: float | None,
    round_to: int,
    total_params: int,
    accepts: Accepts = lambda values: True,
) -> dict[str, int]:
    """Units to remove per group: heads at ``head_ratio``, then channels to bring the total to ``ratio``."""
    heads = [g for g in groups if g.kind == "heads"]
    channels = [g for g in groups if g.kind == "channels"]
    h_frac = ratio if head_ratio is None else head_ratio
    counts = {g.name: heads_to_remove(g, h_frac, accepts) for g in heads}
    if not channels:
        return counts
    budget = ratio * total_params - sum(counts[g.name] * g.params_per_unit() for g in heads)
    c_frac = max(budget, 0.0) / sum(g.units * g.params_per_unit() for g in channels)
    if c_frac >= 1.0:
        log.warning("width: ratio %.2f cannot be met with head_ratio %s; MLPs keep one channel step", ratio, head_ratio)
    counts.update({g.name: channels_to_remove(g.units, min(c_frac, 1.0), round_to) for g in channels})
    return counts


def planned_config(groups: Sequence[Group], counts: Mapping[str, int], accepts: Accepts) -> dict:
    """The HF config values after the cut; they must agree across layers and be accepted by the config class."""
    values: dict = {}
    for group in groups:
        for key, value in group.config(group.units - counts[group.name]).items():
            if values.setdefault(key, value) != value:
                raise PrunekitError(
                    f"width pruning would leave {key} = {values[key]} in one layer and {value} in "
                    f"{group.name}; a Hugging Face config holds one value for all layers"
                )
    if not accepts(values):
        raise PrunekitError(f"the model's config class rejects {values}; choose another ratio / head_ratio / round_to")
    return values


def check_heads(groups: Sequence[Group], head_ratio: float | None, arch: str) -> None:
    """An explicit ``head_ratio`` on a model whose heads cannot go is an error, not a silent no-op."""
    heads = [g for g in groups if g.kind == "heads"]
    if not head_ratio or any(not g.fixed for g in heads):
        return
    why = heads[0].fixed if heads else "no attention whose head count its config can change (head_dim = hidden / heads)"
    raise PrunekitError(f"{arch}: width pruning cannot remove attention heads: {why}; set head_ratio=0")


def rehearse(model: nn.Module, prefix: str, counts: Mapping[str, int], values: Mapping, mlp_key: str | None) -> None:
    """Cut a meta copy of the model the same way and check it is what its new config describes."""
    clone = meta_clone(model)
    for group in find_groups(prefix, clone.get_submodule(prefix), mlp_key):
        group.cut(torch.arange(group.units - counts[group.name]))
    set_config(block_config(clone, prefix), values)
    ensure_reloadable(clone, "width")


# ---------------------------------------------------------------- cutting


def cut_groups(
    groups: Sequence[Group], scores: Mapping[str, torch.Tensor], counts: Mapping[str, int]
) -> dict[str, list[int]]:
    """Remove the ``counts[name]`` lowest-scoring units of each group; returns the removed unit indices."""
    removed = {}
    for group in groups:
        order = torch.argsort(scores[group.name], stable=True)
        drop, keep = order[: counts[group.name]], order[counts[group.name] :].sort().values
        group.cut(keep)
        removed[group.name] = sorted(drop.tolist())
    return removed


@register_structured
@dataclass
class Width(ModelMethod):
    """Remove attention heads (KV groups) and MLP channels with their coupled weights."""

    name: ClassVar[str] = "width"
    score: str = "wanda"
    head_ratio: float | None = None
    round_to: int = 1

    def __post_init__(self):
        if self.score not in SCORES:
            raise PrunekitError(f"unknown width score {self.score!r}; choose from {', '.join(SCORES)}")
        if self.head_ratio is not None and not 0.0 <= self.head_ratio < 1.0:
            raise PrunekitError(f"head_ratio must be in [0, 1) or None (= ratio), got {self.head_ratio}")
        if self.round_to < 1:
            raise PrunekitError(f"round_to must be a positive channel multiple, got {self.round_to}")

    @property
    def needs_calibration(self) -> bool:
        return self.score == "wanda"

    def prune_model(self, model: nn.Module, batches: list, ratio: float) -> dict:
        ratio = check_ratio(ratio)
        if self.needs_calibration:
            check_batches(batches, self.name)
        prefix, blocks = block_list(model)
        check_resizable(model, prefix, blocks, self.name)
        before, total_before = count_params(blocks), count_params(model)
        hf, mlp_key = block_config(model, prefix), mlp_size_key(model)
        groups = find_groups(prefix, blocks, mlp_key)
        check_heads(groups, self.head_ratio, arch_name(model))
        accepts = functools.partial(config_accepts, hf)
        counts = removal_counts(groups, ratio, self.head_ratio, self.round_to, before, accepts)
        config = planned_config(groups, counts, accepts)
        rehearse(model, prefix, counts, config, mlp_key)
        norms = input_norms(model, groups, batches) if self.needs_calibration else None
        scores = {g.name: unit_scores(g, norms) for g in groups}
        removed = cut_groups(groups, scores, counts)
        set_config(hf, config)
        log.info("width: removed %s units per group", sorted(set(counts.values())))
        return summary(
            before,
            count_params(blocks),
            total_before,
            count_params(model),
            score=self.score,
            removed_units={g.name: {"kind": g.kind, "before": g.units, "removed": removed[g.name]} for g in groups},
            config=config,
        )
