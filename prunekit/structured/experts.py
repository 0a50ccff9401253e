"""Expert pruning: remove the least important whole experts of every mixture-of-experts layer.

Importance of expert ``e`` of one layer: the sum, over the calibration tokens the router sends to ``e``, of
the routing weight times ``||expert output||`` -- what the expert adds to the layer's output (Llama 4 scales a
token's input by its router score instead: there the output norm of the scaled row). An expert the router rarely
picks, picks with a small weight, or that outputs little scores low. One forward pass.

Every MoE layer loses the same number of experts, ``round(ratio * E)`` (at least one when ``ratio > 0``),
because the config holds one expert count. The survivors keep their order in every tensor whose leading
dimension is the expert count -- the fused expert tensors and their biases, the router's weight rows, bias
and score-correction buffer -- and the config's count (``num_local_experts`` / ``num_experts`` /
``n_routed_experts``) follows, so ``from_pretrained`` builds the smaller model. Routers that pick experts
in groups (DeepSeek's ``n_group``) lose the same number of experts in every group, which keeps the groups
equal and contiguous as the router's reshape needs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..distributed import sum_over_ranks, together
from ..errors import PrunekitError
from ..forward import hooks
from ..moe import arrivals, expert_output, experts_layout, find_experts, num_experts, routers
from .base import ModelMethod, register_structured
from .common import (
    check_batches,
    check_ratio,
    config_accepts,
    count_params,
    forward,
    hf_config,
    meta_clone,
    set_config,
    summary,
)
from .reload import ensure_reloadable

log = logging.getLogger(__name__)

# Config keys that hold the number of routed experts per layer, across families.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def moe_layers(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """``{experts name: (experts, router)}``, or a one-line error for a model without fused experts."""
    routed = {n: m for n, m in find_experts(model).items() if experts_layout(m).call != "shared"}
    if not routed:
        raise PrunekitError(
            f"structured method 'experts' needs a mixture-of-experts model; {type(model).__name__} has no fused "
            "experts module (transformers 5 MoE: gate_up_proj/down_proj [experts, ...] with a router)"
        )
    for name, experts in routed.items():
        check_removable(name, experts)
    found = routers(model)
    counts = {num_experts(experts) for experts, _ in found.values()}
    if len(counts) != 1:
        raise PrunekitError(f"MoE layers hold different numbers of experts {sorted(counts)}; expected one count")
    return found


def check_removable(name: str, experts: nn.Module) -> None:
    """Whole experts are scored on the rows the router sends them and removed from the module's own ``[experts,
    ...]`` tensors: refuse the layouts where that is not all there is to it (JetMoE's experts are split over two
    modules, DBRX stacks them 2-D in a child, LongCat-Flash has extra rows for its zero-compute experts)."""
    layout = experts_layout(experts)
    count = num_experts(experts, layout)
    shapes = {experts.get_parameter(p).shape[0] for p in layout.params}
    if layout.call == "sized" or layout.count or shapes != {count} or any("." in p for p in layout.params):
        raise PrunekitError(
            f"structured method 'experts' removes whole experts from [experts, ...] tensors of one module; "
            f"{name} ({type(experts).__name__}) stores its experts otherwise ({', '.join(layout.params)}, "
            f"{layout.call} call): prune it unstructured instead"
        )


def experts_to_remove(count: int, ratio: float, groups: int, top_k: int) -> int:
    """Experts removed per group: ``ratio`` of each group's, rounded, at least one if ``ratio > 0``; the
    survivors must still fill the router's top k (and, when grouped, its top-2 ranking inside groups)."""
    per_group = count // groups
    k = math.floor(ratio * per_group + 0.5)
    k = max(k, 1) if ratio > 0 else 0
    left = (per_group - k) * groups
    if left < top_k or (groups > 1 and per_group - k < 2):
        raise PrunekitError(
            f"removing {ratio:.0%} of {count} experts would leave {left}, fewer than the router needs "
            f"(top {top_k}{f', 2 per group of {groups}' if groups > 1 else ''}); lower the ratio"
        )
    return k


# ---------------------------------------------------------------- scores


@torch.no_grad()
def expert_scores(
    model: nn.Module, layers: Mapping[str, tuple[nn.Module, nn.Module]], batches: Sequence
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per MoE layer: ``sum_t w_te ||expert_e(x_t)||`` over routed tokens, and the routed token counts."""
    scores = {n: torch.zeros(num_experts(e), dtype=torch.float64) for n, (e, _) in layers.items()}
    counts = {n: torch.zeros(num_experts(e), dtype=torch.long) for n, (e, _) in layers.items()}

    def hook(name: str):
        def fn(module, args, kwargs):
            arrived = arrivals(module, args, kwargs)
            for e in range(num_experts(module)):
                rows = arrived.rows(e)
                norms = expert_output(module, e, rows).float().norm(dim=-1)
                weighted = norms if arrived.weights is None else arrived.weights(e).float() * norms
                scores[name][e] += weighted.sum().double().cpu()
                counts[name][e] += rows.shape[0]

        return fn

    with together(), hooks(e.register_forward_pre_hook(hook(n), with_kwargs=True) for n, (e, _) in layers.items()):
        for batch in batches:
            forward(model, batch)
    sum_over_ranks(*scores.values(), *counts.values())
    return scores, counts


def lowest_per_group(scores: torch.Tensor, k: int, groups: int) -> list[int]:
    """The ``k`` lowest-scoring experts of each of ``groups`` contiguous groups, sorted."""
    size = scores.numel() // groups
    drop = [
        g * size + i
        for g in range(groups)
        for i in torch.argsort(scores[g * size : (g + 1) * size], stable=True)[:k].tolist()
    ]
    return sorted(drop)


# ---------------------------------------------------------------- removal


@torch.no_grad()
def keep_experts(module: nn.Module, keep: torch.Tensor, count: int) -> None:
    """Keep entries ``keep`` of every own parameter and buffer of ``module`` whose leading dimension is the
    expert ``count``, and its ``num_experts`` attribute in step."""
    for name, p in list(module.named_parameters(recurse=False)):
        if p.dim() and p.shape[0] == count:
            setattr(module, name, nn.Parameter(p.data[keep.to(p.device)].clone(), requires_grad=p.requires_grad))
    for name, b in list(module.named_buffers(recurse=False)):
        if b.dim() and b.shape[0] == count:
            setattr(module, name, b[keep.to(b.device)].clone())
    if isinstance(getattr(module, "num_experts", None), int):
        module.num_experts = keep.numel()
    if isinstance(module, nn.Linear):  # a router that is a Linear (Llama 4)
        module.out_features = keep.numel()


def config_counts(model: nn.Module, before: int, after: int) -> dict[str, int]:
    """The config entries that hold the expert count ``before``, set to ``after``."""
    config = hf_config(model)
    if config is None:
        return {}
    values = {k: after for k in EXPERT_COUNT_KEYS if getattr(config, k, None) == before}
    if not values:
        raise PrunekitError(
            f"the config of {type(model).__name__} holds the expert count {before} under none of "
            f"{', '.join(EXPERT_COUNT_KEYS)}; the pruned model could not be reloaded"
        )
    if not config_accepts(config, values):
        raise PrunekitError(f"the config of {type(model).__name__} rejects {values}; lower the ratio")
    return values


def count_attributes(model: nn.Module, before: int, after: int) -> None:
    """Every module's own expert-count attribute in step (Jamba's MoE block and model copy ``num_experts`` from the
    config when built, and route with it)."""
    for module in model.modules():
        for key in EXPERT_COUNT_KEYS:
            if getattr(module, key, None) == before and not isinstance(getattr(module, key), bool):
                setattr(module, key, after)


def rehearse(model: nn.Module, count: int, after: int, values: Mapping[str, int]) -> None:
    """Remove experts from a meta copy and check it is what its config describes (Jamba builds a dense MLP where a
    layer has one expert), so a count the family cannot load is refused before the real model is touched."""
    clone, keep = meta_clone(model), torch.arange(after)
    for experts, router in moe_layers(clone).values():
        keep_experts(experts, keep, count)
        keep_experts(router, keep, count)
    count_attributes(clone, count, after)
    set_config(hf_config(clone), values)
    ensure_reloadable(clone, "experts")


@register_structured
@dataclass
class Experts(ModelMethod):
    """Remove whole experts of every MoE layer, the lowest router-weighted output norm first."""

    name: ClassVar[str] = "experts"

    def prune_model(self, model: nn.Module, batches: list, ratio: float) -> dict:
        ratio = check_ratio(ratio)
        check_batches(batches, self.name)
        layers = moe_layers(model)
        experts0, router0 = next(iter(layers.values()))
        count, groups = num_experts(experts0), int(getattr(router0, "num_group", 1) or 1)
        top_k = int(getattr(router0, "top_k", getattr(hf_config(model), "num_experts_per_tok", 1)))
        k = experts_to_remove(count, ratio, groups, top_k)
        values = config_counts(model, count, count - k * groups)
        rehearse(model, count, count - k * groups, values)
        modules = [m for pair in layers.values() for m in pair]
        before, total_before = sum(count_params(m) for m in modules), count_params(model)
        scores, routed = expert_scores(model, layers, batches)
        removed = {}
        for name, (experts, router) in layers.items():
            removed[name] = lowest_per_group(scores[name], k, groups)
            keep = torch.tensor([e for e in range(count) if e not in set(removed[name])])
            keep_experts(experts, keep, count)
            keep_experts(router, keep, count)
        count_attributes(model, count, count - k * groups)
        set_config(hf_config(model), values)
        log.info("experts: removed %d of %d experts in each of %d MoE layers", k * groups, count, len(layers))
        return summary(
            before,
            sum(count_params(m) for m in modules),
            total_before,
            count_params(model),
            experts_before=count,
            experts_after=count - k * groups,
            removed_experts=removed,
            expert_scores={n: [round(float(s), 6) for s in v] for n, v in scores.items()},
            routed_tokens={n: v.tolist() for n, v in routed.items()},
        )
