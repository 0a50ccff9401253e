"""Width pruning: remove attention heads (whole KV groups under GQA) and MLP channels, with every coupled
row and column (see ``coupling``), so the result is a smaller dense model.

Importance of a unit (``score``):

* ``wanda`` (default; Wanda-sp, the structured Wanda of the FLAP paper): ``|W_ij| * ||X_j||`` over the unit's
  weights, ``X`` being the input of the layer the weight sits in (rows of q/k/v, gate/up, fc1 see the block's
  normalised hidden states; columns of o_proj/down_proj/fc2 see the attention output / the MLP activations).
  One forward pass.
* ``magnitude``: ``|W_ij|`` (no calibration data).
* ``taylor`` (LLM-Pruner, Ma et al. 2023): the change of the model's own loss when the weights are removed, by
  Taylor expansion, from gradients over the calibration windows (``gradients``). ``taylor=`` picks LLM-Pruner's
  variant: ``param_first`` ``|w g|`` element-wise; ``param_second`` ``w^2 F`` with the Fisher diagonal
  ``F = mean(g^2)`` over windows as the Hessian; ``param_mix`` ``|w g - w^2 F / 2|``; ``vectorize`` ``|sum w g|``
  over each row / column of the unit (then summed over the unit's rows / columns, as LLM-Pruner does). One
  forward and backward pass per window; memory: 4 bytes per scored weight for the gradient sum (8 with ``F``)
  and one window's activations (one block's with ``checkpointing``, the default).

Group aggregation (``reduction``, LLM-Pruner's ``--grouping_strategy``): each layer of a group (q, k, v, o_proj;
gate, up, down_proj) scores every unit position (a position in ``head_dim`` for heads, with the query heads of
a KV group added up; the channel itself for MLPs); ``sum`` / ``mean`` / ``max`` / ``prod`` combine the layers'
scores at each position, ``last`` takes the last layer's (o_proj / down_proj: the paper's "last-only"); the
positions of a unit are then summed. ``sum`` is the total over the unit's weights. LLM-Pruner's code adds up
the query heads of a KV group differently under grouped-query attention: it folds the query projection's
scores with a stride, so KV group ``j`` is scored with query heads ``j, j + kv, ...`` while the heads removed
with it are the ones that read it. ``alignment="strided"`` does the same, to reproduce its published choices;
the default ``grouped`` scores each KV group with its own query heads.

Which blocks may lose units: ``layers`` (default all; ``"1-2"``, ``"4-29"``, ``[1, 2]``), or separately
``head_layers`` / ``channel_layers`` (LLM-Pruner's ``block_attention_layer_*`` / ``block_mlp_layer_*``; its
paper keeps the first and last blocks whole). How much goes: ``ratio`` is the fraction of those blocks'
parameters to remove. Every pruned layer loses the largest number of KV groups, at most ``head_ratio * units``
(``head_ratio`` defaults to ``ratio``), that leaves a head count the model's config class accepts; MLP channels
make up the rest of the parameter budget, the same count in every pruned layer. Heads are coarse units, so they
never overshoot; fine-grained channels land the total near ``ratio``. (transformers 5's LlamaConfig requires
``hidden_size % num_attention_heads == 0`` when it saves or loads, so a 256-wide model with 8 query heads in 4
KV groups can keep 4, 2 or 1 groups, not 3.) Which heads/channels go is chosen per layer. When every block is
pruned the same, the result is a plain model of the same class (``from_pretrained`` reloads it); when some
blocks are left whole, blocks differ in size and ``config.json`` records them (``layer_sizes``): ``prunekit.load``
rebuilds them, plain ``from_pretrained`` cannot. ``head_dim`` is written into the config explicitly, since
``hidden_size / num_attention_heads`` no longer gives it.

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

from ..collect import collect
from ..distributed import reduce_stats, together
from ..errors import PrunekitError
from ..graph import HFConv1D, weight_matrix
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
    forward,
    meta_clone,
    mlp_size_key,
    refusals_named,
    set_config,
    summary,
)
from .coupling import Group, Slot, find_groups
from .gradients import Gradients, accumulate_gradients, loss_kind
from .layer_sizes import RELOAD_NOTE, per_block_record, set_record
from .reload import ensure_reloadable

log = logging.getLogger(__name__)
Accepts = Callable[[Mapping[str, Any]], bool]

SCORES = ("wanda", "magnitude", "taylor")
TAYLOR = ("param_first", "param_second", "param_mix", "vectorize")  # LLM-Pruner's --taylor
REDUCTIONS = ("sum", "mean", "max", "prod", "last")
ALIGNMENTS = ("grouped", "strided")
Blocks = str | int | list[int] | tuple[int, ...] | None


# ---------------------------------------------------------------- which blocks


def parse_blocks(spec: Blocks, what: str = "layers") -> tuple[int, ...] | None:
    """Block indices from ``"1-2"``, ``"0,3-5"``, ``2`` or ``[1, 2]`` (ranges inclusive); None = all blocks."""
    if spec is None:
        return None
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, str):
        try:
            spec = [i for part in spec.split(",") for i in _span(part.strip())]
        except ValueError:
            raise PrunekitError(
                f"width {what} {spec!r} is not a block list; write e.g. '1-2' (inclusive), '0,3-5' or [1, 2]"
            ) from None
    if not spec or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in spec):
        raise PrunekitError(f"width {what} must name blocks by non-negative index (e.g. '1-2' or [1, 2]), got {spec!r}")
    return tuple(sorted(set(spec)))


def _span(part: str) -> range:
    first, _, last = part.partition("-")
    return range(int(first), int(last or first) + 1)


def check_blocks(chosen: tuple[int, ...] | None, n_blocks: int, what: str) -> set[int]:
    """The chosen block indices as a set, all of them when None; an index past the last block is an error."""
    if chosen is None:
        return set(range(n_blocks))
    if chosen[-1] >= n_blocks:
        raise PrunekitError(f"width {what} names block {chosen[-1]}, but the model has blocks 0-{n_blocks - 1}")
    return set(chosen)


# ---------------------------------------------------------------- scores per channel


def as_matrix(layer: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``layer.weight`` in the ``[out, in]`` view of ``weight_matrix`` (HF Conv1D: transposed)."""
    return tensor.t() if isinstance(layer, HFConv1D) else tensor.reshape(tensor.shape[0], -1)


def taylor_salience(w: torch.Tensor, g: torch.Tensor, fisher: torch.Tensor | None, taylor: str) -> torch.Tensor:
    """LLM-Pruner's element-wise salience: the first-order loss change ``w g`` (``param_first``, ``vectorize``),
    the second-order term ``w F w`` with the Fisher diagonal as the Hessian (``param_second``), or both
    (``param_mix``: ``w g - w F w / 2``)."""
    if taylor == "param_second":
        return w * fisher * w
    salience = w * g
    return salience - 0.5 * w * fisher * w if taylor == "param_mix" else salience


def channel_taylor(salience: torch.Tensor, dim: int, vectorize: bool) -> torch.Tensor:
    """Per row (``dim=0``) or column (``dim=1``): ``sum |s|`` (``param_*``) or ``|sum s|`` (``vectorize``)."""
    other = 1 - dim
    return salience.sum(dim=other).abs() if vectorize else salience.abs().sum(dim=other)


def slot_scores(slot: Slot, norms: torch.Tensor | None) -> torch.Tensor:
    """``sum |W_ij| * ||X_j||`` along each row (``dim=0``) or column (``dim=1``) of the slot's layer."""
    w = weight_matrix(slot.layer).detach().float()
    scores = w.abs() if norms is None else wanda_score(w, norms.to(w.device)[None, :])
    return scores.sum(dim=1 - slot.dim)


def slot_taylor(slot: Slot, grads: Gradients, taylor: str) -> torch.Tensor:
    """The Taylor score of every row / column of the slot's layer."""
    w = weight_matrix(slot.layer).detach().float()
    g = as_matrix(slot.layer, grads.grad[slot.name])
    fisher = as_matrix(slot.layer, grads.fisher[slot.name]) if grads.fisher is not None else None
    return channel_taylor(taylor_salience(w, g, fisher, taylor), slot.dim, taylor == "vectorize")


# ---------------------------------------------------------------- scores per unit


def unit_positions(per_unit: torch.Tensor, width: int) -> torch.Tensor:
    """``[units, per_unit]`` channel scores as ``[units, width]`` unit positions: consecutive blocks of ``width``
    added up (the query heads of a KV group at each ``head_dim`` position)."""
    return per_unit.reshape(per_unit.shape[0], -1, width).sum(dim=1)


def reduce_layers(stacked: torch.Tensor, writers: list[int], reduction: str) -> torch.Tensor:
    """Combine ``[layers, units, positions]`` over the group's layers (``last``: the layers writing the output)."""
    if reduction == "sum":
        return stacked.sum(0)
    if reduction == "mean":
        return stacked.mean(0)
    if reduction == "max":
        return stacked.max(0).values
    if reduction == "prod":
        return stacked.prod(0)
    return stacked[writers].sum(0)


def strided_positions(scores: torch.Tensor, units: int, width: int, name: str) -> torch.Tensor:
    """LLM-Pruner's alignment of a layer with ``r`` times the group's ``units * width`` channels: its channel
    scores as ``[r, units * width]`` summed over ``r`` (``imp.view(len // min, min).sum(0)``), so KV group ``j`` is
    credited with query heads ``j, j + kv, j + 2 kv ...``, not the ones that read it (which are the ones removed)."""
    if scores.numel() % (units * width):
        raise PrunekitError(f"{name}: {scores.numel()} channels cannot be aligned to {units} x {width} positions")
    return scores.reshape(-1, units * width).sum(dim=0).reshape(units, width)


def unit_scores(
    group: Group, channels: Mapping[str, torch.Tensor], reduction: str = "sum", alignment: str = "grouped"
) -> torch.Tensor:
    """Importance of each unit of ``group`` from its slots' per-channel scores ``channels[slot.name]``: per unit
    position, combined over the slots by ``reduction``, then summed over positions (float64). ``alignment``:
    which channels make a unit's positions: its own (``grouped``) or LLM-Pruner's ``strided`` ones."""
    widths = [s.index.shape[1] for s in group.slots]
    width = min(widths) if all(w % min(widths) == 0 for w in widths) else 1
    rows = [
        strided_positions(channels[s.name].cpu().double(), group.units, width, s.name)
        if alignment == "strided"
        else unit_positions(channels[s.name].cpu().double()[s.index], width)
        for s in group.slots
    ]
    writers = [i for i, s in enumerate(group.slots) if s.dim == 1]
    return reduce_layers(torch.stack(rows), writers, reduction).sum(dim=1)


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


def block_values(groups: Sequence[Group], counts: Mapping[str, int], n_blocks: int) -> list[dict]:
    """Per block, the HF config values its groups imply after the cut."""
    values: list[dict] = [{} for _ in range(n_blocks)]
    for group in groups:
        values[max(group.block, 0)].update(group.config(group.units - counts.get(group.name, 0)))
    return values


def planned_config(
    groups: Sequence[Group], counts: Mapping[str, int], accepts: Accepts, n_blocks: int
) -> tuple[dict, list[dict] | None]:
    """The HF config values after the cut and, when blocks end up with different sizes, the per-block record
    (``layer_sizes``); every block's values must be ones the config class accepts."""
    per_block = block_values(groups, counts, n_blocks)
    values, record = per_block_record(per_block)
    for candidate in [values, *per_block]:
        if not accepts(candidate):
            raise PrunekitError(
                f"the model's config class rejects {candidate}; choose another ratio / head_ratio / round_to"
            )
    return values, record


def check_heads(groups: Sequence[Group], head_ratio: float | None, arch: str) -> None:
    """An explicit ``head_ratio`` on a model whose heads cannot go is an error, not a silent no-op."""
    heads = [g for g in groups if g.kind == "heads"]
    if not head_ratio or any(not g.fixed for g in heads):
        return
    why = heads[0].fixed if heads else "no attention whose head count its config can change (head_dim = hidden / heads)"
    raise PrunekitError(f"{arch}: width pruning cannot remove attention heads: {why}; set head_ratio=0")


def rehearse(
    model: nn.Module, prefix: str, counts: Mapping[str, int], values: Mapping, record: list | None, mlp_key: str | None
) -> None:
    """Cut a meta copy of the model the same way and check it is what its new config describes."""
    clone = meta_clone(model)
    for group in find_groups(prefix, clone.get_submodule(prefix), mlp_key):
        group.cut(torch.arange(group.units - counts.get(group.name, 0)))
    config = block_config(clone, prefix)
    set_config(config, values)
    set_record(config, record)
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
        if counts[group.name]:
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
    taylor: str | None = None  # LLM-Pruner's variant, for score="taylor" (default param_first)
    reduction: str = "sum"
    layers: Blocks = None
    head_layers: Blocks = None
    channel_layers: Blocks = None
    checkpointing: bool | None = None  # score="taylor": recompute each block in the backward pass (default on)
    alignment: str = "grouped"  # "strided": LLM-Pruner's code, to reproduce its published choices

    def __post_init__(self):
        if self.score not in SCORES:
            raise PrunekitError(f"unknown width score {self.score!r}; choose from {', '.join(SCORES)}")
        if self.alignment not in ALIGNMENTS:
            raise PrunekitError(f"unknown width alignment {self.alignment!r}; choose from {', '.join(ALIGNMENTS)}")
        if self.head_ratio is not None and not 0.0 <= self.head_ratio < 1.0:
            raise PrunekitError(f"head_ratio must be in [0, 1) or None (= ratio), got {self.head_ratio}")
        if self.round_to < 1:
            raise PrunekitError(f"round_to must be a positive channel multiple, got {self.round_to}")
        if self.reduction not in REDUCTIONS:
            raise PrunekitError(f"unknown width reduction {self.reduction!r}; choose from {', '.join(REDUCTIONS)}")
        self._check_taylor_params()
        for what in ("layers", "head_layers", "channel_layers"):
            parse_blocks(getattr(self, what), what)

    def _check_taylor_params(self) -> None:
        if self.taylor is not None and self.taylor not in TAYLOR:
            raise PrunekitError(f"unknown width taylor {self.taylor!r}; choose from {', '.join(TAYLOR)}")
        given = [k for k in ("taylor", "checkpointing") if getattr(self, k) is not None]
        if self.score != "taylor" and given:
            raise PrunekitError(f"width {' and '.join(given)} apply to score=taylor only; drop or set score=taylor")

    @property
    def needs_calibration(self) -> bool:
        return self.score != "magnitude"

    @property
    def variant(self) -> str:
        return self.taylor or "param_first"

    def chosen_blocks(self, n_blocks: int) -> dict[str, set[int]]:
        """Per group kind, the blocks whose units may go."""
        both = parse_blocks(self.layers, "layers")
        own = {"heads": ("head_layers", self.head_layers), "channels": ("channel_layers", self.channel_layers)}
        return {
            kind: check_blocks(parse_blocks(spec, what) if spec is not None else both, n_blocks, what)
            for kind, (what, spec) in own.items()
        }

    def channel_scores(self, model: nn.Module, groups: Sequence[Group], batches: list, blocks) -> tuple[dict, dict]:
        """Every slot's per-channel scores (and, for Taylor, what its gradients took)."""
        slots = {s.name: s for g in groups for s in g.slots}
        if self.score == "taylor":
            grads = accumulate_gradients(
                model,
                {name: s.layer.weight for name, s in slots.items()},
                batches,
                fisher=self.variant in ("param_second", "param_mix"),
                blocks=list(blocks) if self.checkpointing is not False else (),
            )
            scores = {name: slot_taylor(s, grads, self.variant) for name, s in slots.items()}
            return scores, gradient_report(grads, self.checkpointing is not False)
        norms = input_norms(model, groups, batches) if self.score == "wanda" else None
        return {name: slot_scores(s, None if norms is None else norms[name]) for name, s in slots.items()}, {}

    def plan(self, model: nn.Module, prefix: str, blocks: nn.Module, ratio: float) -> tuple:
        """The groups that may lose units, how many each loses, the config values and per-block record after the
        cut, and the chosen blocks; rehearsed on a meta copy, so nothing here touches the model."""
        chosen = self.chosen_blocks(len(blocks))
        hf, mlp_key = block_config(model, prefix), mlp_size_key(model)
        all_groups = find_groups(prefix, blocks, mlp_key)
        groups = [g for g in all_groups if g.block in chosen[g.kind]]
        check_heads(groups, self.head_ratio, arch_name(model))
        accepts = functools.partial(config_accepts, hf)
        in_range = sum(count_params(blocks[i]) for i in chosen["heads"] | chosen["channels"])
        counts = removal_counts(groups, ratio, self.head_ratio, self.round_to, in_range, accepts)
        config, record = planned_config(all_groups, counts, accepts, len(blocks))
        rehearse(model, prefix, counts, config, record, mlp_key)
        return groups, counts, config, record, chosen

    def prune_model(self, model: nn.Module, batches: list, ratio: float) -> dict:
        ratio = check_ratio(ratio)
        if self.needs_calibration:
            check_batches(batches, self.name)
        prefix, blocks = block_list(model)
        check_resizable(model, prefix, blocks, self.name)
        if self.score == "taylor":
            loss_kind(model, batches[0])
        before, total_before = count_params(blocks), count_params(model)
        with refusals_named(model):
            groups, counts, config, record, chosen = self.plan(model, prefix, blocks, ratio)
        channels, memory = self.channel_scores(model, groups, batches, blocks)
        scores = {g.name: unit_scores(g, channels, self.reduction, self.alignment) for g in groups}
        removed = cut_groups(groups, scores, counts)
        hf = block_config(model, prefix)
        set_config(hf, config)
        set_record(hf, record)
        log.info("width: removed %s units per group", sorted(set(counts.values())))
        return summary(
            before,
            count_params(blocks),
            total_before,
            count_params(model),
            score=self.score if self.score != "taylor" else f"taylor ({self.variant}, {self.reduction})",
            pruned_blocks={kind: sorted(found) for kind, found in chosen.items()},
            removed_units={g.name: {"kind": g.kind, "before": g.units, "removed": removed[g.name]} for g in groups},
            config=config,
            **({"layer_sizes": record, "reload": RELOAD_NOTE} if record else {"reload": "from_pretrained"}),
            **memory,
        )


def gradient_report(grads: Gradients, checkpointing: bool) -> dict:
    """What the gradient scores held in memory, for the report."""
    held = "one block's activations (checkpointing)" if checkpointing else "one window's activations"
    return {
        "gradient_windows": grads.windows,
        "gradient_sum_bytes": grads.nbytes(),
        "gradient_memory": f"float32 gradient sums of the scored weights ({grads.nbytes():,} bytes) + {held}",
    }
