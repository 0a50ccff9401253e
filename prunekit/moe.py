"""Mixture-of-experts weights as matmuls: fused expert tensors, routers, and the tokens each expert sees.

transformers 5 stores a block's experts as fused 3-D parameters in one module called as
``experts(hidden_states [tokens, H], top_k_index [tokens, k], top_k_weights [tokens, k])``. Its
``@use_experts_implementation`` decorator records the layout on the module, and this file reads only
those attributes, so every decorated family works without a per-family table:

* ``has_gate``: ``gate_up_proj`` then the module's own ``_apply_gate`` (concatenated or interleaved halves,
  clamps) -- else ``up_proj`` then ``act_fn``; then ``down_proj``;
* ``is_transposed``: stored ``[E, in, out]`` instead of the Linear layout ``[E, out, in]``;
* ``has_bias``: ``<param>_bias [E, out]`` is added (biases are not pruned).

Expert ``e`` of parameter ``p`` is the matmul ``p[e]``: an ``ExpertWeight`` view named ``<experts>.<p>.<e>``
that the walker lists like a Linear. Its input rows are the tokens routed to expert ``e`` (the up
projection) and those tokens' activated up projection (the down projection), recomputed in a forward
pre-hook from the module's own weights and gate, so the forward pass itself is never changed.
Interleaved gate/up halves need nothing else: every method treats output rows alike (per-output groups,
N:M along the inputs, row-wise reconstruction), so the row order does not matter.

Experts modules with another calling convention (Llama 4 receives tokens already dispatched per expert)
are not recognised; their tensors stay dense and the walker does not list them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import PrunekitError
from .forward import hidden_state

log = logging.getLogger(__name__)

LAYOUT_ATTRIBUTES = ("has_gate", "is_transposed", "has_bias")  # set by @use_experts_implementation
DOWN = "down_proj"


# ---------------------------------------------------------------- recognising experts and routers


def up_param(experts: nn.Module) -> str:
    """The parameter that reads the hidden state: ``gate_up_proj`` (gated experts) or ``up_proj``."""
    return "gate_up_proj" if experts.has_gate else "up_proj"


def is_fused_experts(module: nn.Module) -> bool:
    """A decorated experts module whose up and down projections are 3-D ``[experts, ., .]`` parameters."""
    if not all(hasattr(module, a) for a in LAYOUT_ATTRIBUTES):
        return False
    params = [getattr(module, up_param(module), None), getattr(module, DOWN, None)]
    return (
        all(isinstance(p, nn.Parameter) and p.dim() == 3 for p in params) and params[0].shape[0] == params[1].shape[0]
    )


def num_experts(experts: nn.Module) -> int:
    return getattr(experts, DOWN).shape[0]


def parent_name(name: str) -> str:
    return name.rpartition(".")[0]


def find_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Every fused experts module, by name, in registration order."""
    return {name: m for name, m in model.named_modules() if is_fused_experts(m)}


def gate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Routers and gates of the MoE blocks: the single matrices (a 2-D ``weight`` and no children) next to an
    experts module (Mixtral's ``gate``, GPT-OSS's ``router``, Qwen2-MoE's ``shared_expert_gate``). They compute
    ``x @ weight.T`` like a Linear; the walker lists them but keeps them dense unless an include names them."""
    gates = {}
    for name in find_experts(model):
        block_name = parent_name(name)
        block = model.get_submodule(block_name)
        for child_name, child in block.named_children():
            weight = getattr(child, "weight", None)
            if is_fused_experts(child) or next(child.children(), None) is not None:
                continue
            if isinstance(weight, nn.Parameter) and weight.dim() == 2:
                gates[f"{block_name}.{child_name}" if block_name else child_name] = child
    return gates


def routers(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """``{experts name: (experts, router)}``: the router is the gate whose weight has one row per expert."""
    found = {}
    gates = gate_modules(model)
    for name, experts in find_experts(model).items():
        mine = [g for n, g in gates.items() if parent_name(n) == parent_name(name)]
        rows = [g for g in mine if g.weight.shape[0] == num_experts(experts)]
        if len(rows) != 1:
            raise PrunekitError(
                f"{name}: found {len(rows)} router(s) with one weight row per expert next to it; "
                "cannot tell which one routes to these experts"
            )
        found[name] = (experts, rows[0])
    return found


# ---------------------------------------------------------------- one expert's matrix


@dataclass(eq=False)
class ExpertWeight:
    """Expert ``index`` of the fused parameter ``param`` of ``experts``, seen as one Linear-layout matmul.

    ``block`` is the MoE block that calls ``experts`` (its input's batch size counts calibration samples, as
    for every other layer of the block); ``tokens`` which tokens calibrate it (``routed`` or ``all``);
    ``routed_tokens`` how many tokens the router sent it in the latest calibration pass.
    """

    experts: nn.Module
    param: str
    index: int
    block: nn.Module | None = None
    tokens: str = "routed"
    routed_tokens: int | None = None

    @property
    def weight(self) -> torch.Tensor:
        """This expert's slice of the fused parameter, in its stored layout (a view: writes go through)."""
        return getattr(self.experts, self.param)[self.index]

    def matrix(self) -> torch.Tensor:
        """``[out, in]``: the stored slice, transposed back when the experts store ``[in, out]``."""
        return self.weight.t() if self.experts.is_transposed else self.weight

    @torch.no_grad()
    def set_matrix(self, matrix: torch.Tensor) -> None:
        w = self.weight
        matrix = matrix.t() if self.experts.is_transposed else matrix
        w.copy_(matrix.to(dtype=w.dtype, device=w.device))


def expert_weights(name: str, experts: nn.Module, block: nn.Module | None = None) -> dict[str, ExpertWeight]:
    """One ``ExpertWeight`` per (parameter, expert), named ``<name>.<param>.<expert>``, up before down."""
    params = (up_param(experts), DOWN)
    return {f"{name}.{p}.{e}": ExpertWeight(experts, p, e, block) for p in params for e in range(num_experts(experts))}


def calibrated_on(layers: Mapping[str, Any], tokens: str) -> dict[str, Any]:
    """``layers`` with every expert view calibrated on ``tokens`` (``routed`` or ``all``; ``PruneConfig`` checked
    which)."""
    return {n: replace(m, tokens=tokens) if isinstance(m, ExpertWeight) else m for n, m in layers.items()}


# ---------------------------------------------------------------- what an expert computes


def routing_call(
    experts: nn.Module, args: tuple, kwargs: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden_states, top_k_index, top_k_weights)`` of one experts call, whatever the families name them
    (GPT-OSS: ``router_indices``, ``routing_weights``)."""
    bound = inspect.signature(experts.forward).bind(*args, **kwargs)
    values = list(bound.arguments.values())
    if len(values) < 3 or not all(isinstance(v, torch.Tensor) for v in values[:3]):
        raise PrunekitError(
            f"{type(experts).__name__} was not called as experts(hidden_states, top_k_index, top_k_weights); "
            "prunekit cannot tell which tokens each expert sees"
        )
    return values[0], values[1], values[2]


def routed_rows(top_k_index: torch.Tensor, expert: int) -> torch.Tensor:
    """Indices of the tokens that chose ``expert`` among their top k."""
    return (top_k_index == expert).any(dim=-1).nonzero().squeeze(1)


def expert_linear(experts: nn.Module, param: str, expert: int, x: torch.Tensor) -> torch.Tensor:
    """``x`` through one expert's matrix of ``param`` (and its bias), as the experts module computes it."""
    w = getattr(experts, param)[expert]
    y = x @ w if experts.is_transposed else x @ w.t()
    return y + getattr(experts, f"{param}_bias")[expert] if experts.has_bias else y


def expert_hidden(experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """The down projection's input: the gated (``_apply_gate``) or activated (``act_fn``) up projection."""
    up = expert_linear(experts, up_param(experts), expert, x)
    return experts._apply_gate(up) if experts.has_gate else experts.act_fn(up)


def expert_output(experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """What expert ``expert`` returns for tokens ``x`` before the routing weight is applied."""
    y = expert_linear(experts, DOWN, expert, expert_hidden(experts, expert, x))
    return experts.post_expert_norm(y) if getattr(experts, "has_post_expert_norm", False) else y


# ---------------------------------------------------------------- calibration hooks

Feed = Callable[[str, torch.Tensor, int], None]  # (layer name, input rows [n, cols], batch items)


class _ExpertSite:
    """The selected expert views of one experts module: a pre-hook computes each one's input rows."""

    def __init__(self, views: list[tuple[str, ExpertWeight]], feed: Feed):
        self.views, self.feed = views, feed
        self.experts, self.block = views[0][1].experts, views[0][1].block
        self.samples = 1

    def register(self) -> list[RemovableHandle]:
        handles = [self.experts.register_forward_pre_hook(self.on_experts, with_kwargs=True)]
        if self.block is not None:
            handles.append(self.block.register_forward_pre_hook(self.on_block, with_kwargs=True))
        return handles

    def on_block(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = hidden_state(args, kwargs) if args or kwargs else None
        self.samples = hidden.shape[0] if isinstance(hidden, torch.Tensor) and hidden.dim() > 2 else 1

    @torch.no_grad()
    def on_experts(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, index, _ = routing_call(module, args, kwargs)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        index = index.reshape(hidden.shape[0], -1)
        inputs: dict[tuple[int, str, str], torch.Tensor] = {}
        routed = {e: routed_rows(index, e) for e in {view.index for _, view in self.views}}
        for name, view in self.views:
            view.routed_tokens += routed[view.index].numel()
            self.feed(name, self._input(view, hidden, routed[view.index], inputs), self.samples)

    def _input(self, view: ExpertWeight, hidden: torch.Tensor, routed: torch.Tensor, cache: dict) -> torch.Tensor:
        """The view's input rows (shared by the views of one expert through ``cache``)."""
        kind = "up" if view.param == up_param(self.experts) else "down"
        key = (view.index, view.tokens, kind)
        if key not in cache:
            x = hidden if view.tokens == "all" else hidden[routed]
            cache[key] = x if kind == "up" else expert_hidden(self.experts, view.index, x)
        return cache[key]


def expert_hooks(views: Mapping[str, ExpertWeight], feed: Feed) -> list[RemovableHandle]:
    """Register the hooks that hand each expert view its input rows (``feed``); counts start again at 0."""
    by_module: dict[int, list[tuple[str, ExpertWeight]]] = {}
    for name, view in views.items():
        view.routed_tokens = 0
        by_module.setdefault(id(view.experts), []).append((name, view))
    return [h for members in by_module.values() for h in _ExpertSite(members, feed).register()]


# ---------------------------------------------------------------- what the report says


def expert_views(layers: Mapping[str, Any]) -> Iterator[tuple[str, ExpertWeight]]:
    return ((n, m) for n, m in layers.items() if isinstance(m, ExpertWeight))


def routed_counts(layers: Mapping[str, Any]) -> dict[str, list[int | None]]:
    """``{experts module name: [tokens routed to expert 0, 1, ...]}`` from the selected views' latest pass
    (None for an expert none of whose matrices was selected; nothing without a calibration pass)."""
    counts: dict[str, list[int | None]] = {}
    for name, view in expert_views(layers):
        if view.routed_tokens is not None:
            row = counts.setdefault(parent_name(parent_name(name)), [None] * num_experts(view.experts))
            row[view.index] = view.routed_tokens
    return counts


def few_tokens(layers: Mapping[str, Any], minimum: int) -> list[dict[str, Any]]:
    """The experts whose statistics came from fewer than ``minimum`` tokens (routed, or all with ``all``)."""
    low, seen = [], set()
    for name, view in expert_views(layers):
        module_name = parent_name(parent_name(name))
        if view.tokens == "all" or view.routed_tokens is None or (module_name, view.index) in seen:
            continue
        seen.add((module_name, view.index))
        if view.routed_tokens < minimum:
            low.append({"experts": module_name, "expert": view.index, "tokens": view.routed_tokens})
    return low


def warn_few_tokens(low: list[dict[str, Any]], minimum: int) -> None:
    """Log the experts ``few_tokens`` found; those that got no token at all separately, as their masks mean
    nothing (all-zero inputs: SparseGPT zeroes the whole expert, input-aware scores all tie)."""
    if not low:
        return
    first = low[0]
    log.warning(
        "%d expert(s) were calibrated on fewer than %d routed tokens (e.g. %s expert %d: %d tokens); their "
        "statistics are noisy: calibrate on more data, or on every token with expert_tokens='all'",
        len(low),
        minimum,
        first["experts"],
        first["expert"],
        first["tokens"],
    )
    unseen = sum(row["tokens"] == 0 for row in low)
    if unseen:
        log.warning(
            "%d of them got no token at all: on all-zero inputs SparseGPT zeroes such an expert completely and "
            "input-aware scores (Wanda, RIA) all tie; use expert_tokens='all' for these models",
            unseen,
        )


def expert_report(model: nn.Module, layers: Mapping[str, Any], tokens: str, minimum: int) -> dict[str, Any] | None:
    """The MoE part of a prune report (None for a model without fused experts): routed token counts per
    experts module, the experts calibrated on too few tokens (also logged) and the routers left dense."""
    gates = gate_modules(model)
    if not gates and not any(True for _ in expert_views(layers)):
        return None
    low = few_tokens(layers, minimum)
    warn_few_tokens(low, minimum)
    return {
        "expert_tokens": tokens,
        "min_tokens": minimum,
        "routed_tokens": routed_counts(layers),
        "few_tokens": low,
        "dense_gates": sorted(n for n in gates if n not in layers),
    }
