"""Mixture-of-experts weights as matmuls: fused expert tensors, routers, and the tokens each expert sees.

transformers 5 stores a block's experts as fused parameters ``[experts, out, in]`` of one module. How that module
stores and is called is an ``ExpertsLayout`` (``prunekit.architectures``): read off the attributes transformers'
``@use_experts_implementation`` decorator records on the module (``has_gate``, ``is_transposed``, ``has_bias``,
``has_post_expert_norm``) for every decorated family, and taken from ``EXPERTS_LAYOUTS`` for the few classes without
the decorator (Llama 4, JetMoE, DBRX, ...). This file knows no family: it reads the layout.

Expert ``e`` of parameter ``p`` is the matmul ``p[e]``: an ``ExpertWeight`` view named ``<experts>.<p>.<e>`` that
the walker lists like a Linear. Its input rows are the tokens that reach expert ``e`` (the up projection) and
those tokens' activated up projection (the down projection), recomputed in a forward pre-hook from the module's
own weights and gate, so the forward pass itself is never changed. Which tokens reach an expert depends on the
calling convention (``ExpertsLayout.call``): picked by the router's top-k index, already dispatched per expert, or
sorted by expert with a size per expert. Interleaved gate/up halves need nothing else: every method treats output
rows alike (per-output groups, N:M along the inputs, row-wise reconstruction), so the row order does not matter.

A module that holds what look like fused expert weights in a layout prunekit does not know (``unknown_experts``)
is refused when the layer selection would include it, never silently left dense.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .architectures import EXPERTS_LAYOUTS, ExpertsLayout
from .errors import PrunekitError
from .forward import hidden_state

log = logging.getLogger(__name__)

DECORATOR_ATTRIBUTES = ("has_gate", "is_transposed", "has_bias")  # set by @use_experts_implementation
EXPERT_COUNT_ATTRIBUTES = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


# ---------------------------------------------------------------- layouts


@functools.cache
def _decorated(has_gate: bool, is_transposed: bool, has_bias: bool, post_norm: bool) -> ExpertsLayout:
    params = ("gate_up_proj" if has_gate else "up_proj", "down_proj")
    return ExpertsLayout(
        params=params,
        transposed=params if is_transposed else (),
        bias=has_bias,
        gate="module" if has_gate else "act",
        post_norm=post_norm,
    )


def declared_layout(module: nn.Module) -> ExpertsLayout | None:
    """The layout ``module`` declares: its class's (or a base class's) entry in ``EXPERTS_LAYOUTS``, else the
    attributes of transformers' decorator, else None."""
    for cls in type(module).__mro__:
        if cls.__name__ in EXPERTS_LAYOUTS:
            return EXPERTS_LAYOUTS[cls.__name__]
    if not all(hasattr(module, a) for a in DECORATOR_ATTRIBUTES):
        return None
    flags = (module.has_gate, module.is_transposed, module.has_bias, getattr(module, "has_post_expert_norm", False))
    return _decorated(*(bool(f) for f in flags))


def _parameter(module: nn.Module, path: str) -> nn.Parameter | None:
    try:
        return module.get_parameter(path)
    except AttributeError:
        return None


def _attribute(module: nn.Module, path: str) -> Any:
    return functools.reduce(getattr, path.split("."), module)


def num_experts(experts: nn.Module, layout: ExpertsLayout | None = None) -> int:
    """How many experts the module holds: ``layout.count``'s value, else the last parameter's leading size (the
    first ones may hold more rows, as LongCat-Flash's unused rows for its zero-compute experts)."""
    layout = layout or experts_layout(experts)
    if layout.count:
        return int(getattr(experts, layout.count))
    return experts.get_parameter(layout.params[-1]).shape[0]


def _fits(module: nn.Module, layout: ExpertsLayout) -> bool:
    """Whether ``module`` holds the parameters ``layout`` names, with one slice per expert."""
    params = [_parameter(module, p) for p in layout.params]
    if any(p is None or p.dim() != (2 if layout.count else 3) for p in params):
        return False
    if layout.count:
        count = getattr(module, layout.count, None)
        return isinstance(count, int) and count > 0 and all(p.shape[0] % count == 0 for p in params)
    return all(p.shape[0] >= params[-1].shape[0] for p in params)


def experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """The layout of a fused experts module whose parameters fit the layout it declares; None for anything else."""
    layout = declared_layout(module)
    return layout if layout is not None and _fits(module, layout) else None


def is_fused_experts(module: nn.Module) -> bool:
    return experts_layout(module) is not None


def parent_name(name: str) -> str:
    return name.rpartition(".")[0]


def find_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Every fused experts module, by name, in registration order."""
    return {name: m for name, m in model.named_modules() if is_fused_experts(m)}


def holds_expert_weights(module: nn.Module) -> bool:
    """Whether ``module`` itself holds what look like fused expert weights: a parameter of two or more dimensions
    in a class named ``*Expert*``, or of three or more next to an expert count (``num_experts``, ...). Linears and
    embeddings are what they are, whatever their name."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return False
    named = "expert" in type(module).__name__.lower()
    counted = any(isinstance(getattr(module, a, None), int) for a in EXPERT_COUNT_ATTRIBUTES)
    own = [p for p in module.parameters(recurse=False) if p.dim() >= 2]
    return any(named or (counted and p.dim() >= 3) for p in own)


def unknown_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Modules holding what look like fused expert weights that no known layout covers (a new family, or a
    transformers release that changed one): pruning around them would leave most of the model dense."""
    known = find_experts(model)
    covered = {id(m.get_parameter(p)) for m in known.values() for p in experts_layout(m).params}
    return {
        name: m
        for name, m in model.named_modules()
        if name not in known
        and holds_expert_weights(m)
        and not all(id(p) in covered for p in m.parameters(recurse=False) if p.dim() >= 2)
    }


def _is_matrix(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.dim() == 2


def _single_matrix(module: nn.Module) -> nn.Module | None:
    """The one module below (or at) ``module`` that holds a 2-D ``weight``, when there is exactly one."""
    found = [m for m in module.modules() if _is_matrix(m) and next(m.children(), None) is None]
    return found[0] if len(found) == 1 else None


def gate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Routers and gates of the MoE blocks: the single matrices next to an experts module (Mixtral's ``gate``,
    GPT-OSS's ``router``, Qwen2-MoE's ``shared_expert_gate``), or alone inside a child (JetMoE's and DBRX's
    ``router.layer``). They compute ``x @ weight.T`` like a Linear; the walker lists them but keeps them dense
    unless an include names them."""
    gates = {}
    modules = {id(m): n for n, m in model.named_modules()}
    for name in find_experts(model):
        block = model.get_submodule(parent_name(name))
        for child in block.children():
            if is_fused_experts(child):
                continue
            gate = _single_matrix(child)
            if gate is not None:
                gates[modules[id(gate)]] = gate
    return gates


def routers(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """``{experts name: (experts, router)}``: the router is the gate whose weight has one row per expert."""
    found = {}
    gates = gate_modules(model)
    for name, experts in find_experts(model).items():
        if experts_layout(experts).call == "shared":  # every token passes them: not routed
            continue
        mine = [g for n, g in gates.items() if n.startswith(f"{parent_name(name)}.") or not parent_name(name)]
        rows = [g for g in mine if g.weight.shape[0] == num_experts(experts)]
        if len(rows) != 1:
            raise PrunekitError(
                f"{name}: found {len(rows)} router(s) with one weight row per expert next to it; "
                "cannot tell which one routes to these experts"
            )
        found[name] = (experts, rows[0])
    return found


# ---------------------------------------------------------------- one expert's matrix


def expert_slice(tensor: torch.Tensor, index: int, count: int, stacked: bool) -> torch.Tensor:
    """Expert ``index``'s slice of a fused tensor (a view: writes go through): ``tensor[index]``, or of a stacked
    2-D ``[count * out, in]`` tensor its ``index``-th block of rows."""
    return tensor.view(count, -1, tensor.shape[-1])[index] if stacked else tensor[index]


@dataclass(eq=False)
class ExpertWeight:
    """Expert ``index`` of the fused parameter ``param`` of ``experts``, seen as one Linear-layout matmul.

    ``block`` is the MoE block that calls ``experts`` (its input's batch size counts calibration samples, as for
    every other layer of the block) and ``outer`` the module around it (counts them when the block itself is not
    called: JetMoE's attention experts); ``tokens`` which tokens calibrate it (``routed`` or ``all``);
    ``routed_tokens`` how many tokens reached it in the latest calibration pass.
    """

    experts: nn.Module
    param: str
    index: int
    block: nn.Module | None = None
    outer: nn.Module | None = None
    tokens: str = "routed"
    routed_tokens: int | None = None
    layout: ExpertsLayout | None = None

    def __post_init__(self):
        if self.layout is None:
            self.layout = experts_layout(self.experts)

    def _slice(self, tensor: torch.Tensor) -> torch.Tensor:
        return expert_slice(tensor, self.index, num_experts(self.experts, self.layout), bool(self.layout.count))

    @property
    def weight(self) -> torch.Tensor:
        """This expert's slice of the fused parameter, in its stored layout (a view: writes go through)."""
        return self._slice(self.experts.get_parameter(self.param))

    def grad(self) -> torch.Tensor | None:
        """This expert's slice of the fused parameter's gradient (a view), None before a backward pass."""
        grad = self.experts.get_parameter(self.param).grad
        return None if grad is None else self._slice(grad)

    @property
    def transposed(self) -> bool:
        return self.param in self.layout.transposed

    def matrix(self) -> torch.Tensor:
        """``[out, in]``: the stored slice, transposed back when the experts store ``[in, out]``."""
        return self.weight.t() if self.transposed else self.weight

    @torch.no_grad()
    def set_matrix(self, matrix: torch.Tensor) -> None:
        w = self.weight
        matrix = matrix.t() if self.transposed else matrix
        w.copy_(matrix.to(dtype=w.dtype, device=w.device))


def expert_weights(
    name: str, experts: nn.Module, block: nn.Module | None = None, outer: nn.Module | None = None
) -> dict[str, ExpertWeight]:
    """One ``ExpertWeight`` per (parameter, expert), named ``<name>.<param>.<expert>``, in forward order."""
    layout = experts_layout(experts)
    outer = None if outer is block else outer
    return {
        f"{name}.{p}.{e}": ExpertWeight(experts, p, e, block, outer, layout=layout)
        for p in layout.params
        for e in range(num_experts(experts, layout))
    }


def experts_name(name: str, view: ExpertWeight) -> str:
    """The experts module's name from one of its views' names (``<experts>.<param>.<expert>``)."""
    return name.removesuffix(f".{view.param}.{view.index}")


def calibrated_on(layers: Mapping[str, Any], tokens: str) -> dict[str, Any]:
    """``layers`` with every expert view calibrated on ``tokens`` (``routed`` or ``all``; ``PruneConfig`` checked
    which). Experts that only ever see their own routed tokens cannot calibrate on all of them: refused."""
    if tokens == "all":
        for name, view in expert_views(layers):
            if view.layout.call == "sized":
                raise PrunekitError(
                    f"expert_tokens='all' needs each expert's input for every token, but {experts_name(name, view)} "
                    f"({type(view.experts).__name__}) receives only the tokens routed to each expert; use "
                    "expert_tokens='routed' or exclude its layers"
                )
    return {n: replace(m, tokens=tokens) if isinstance(m, ExpertWeight) else m for n, m in layers.items()}


# ---------------------------------------------------------------- what an expert computes


def expert_linear(experts: nn.Module, layout: ExpertsLayout, param: str, expert: int, x: torch.Tensor) -> torch.Tensor:
    """``x`` through one expert's matrix of ``param`` (and its bias), as the experts module computes it."""
    count = num_experts(experts, layout)
    w = expert_slice(experts.get_parameter(param), expert, count, bool(layout.count))
    y = x @ w if param in layout.transposed else x @ w.t()
    if layout.bias:
        y = y + expert_slice(experts.get_parameter(f"{param}_bias"), expert, count, bool(layout.count))
    return y


def expert_hidden(experts: nn.Module, layout: ExpertsLayout, expert: int, x: torch.Tensor) -> torch.Tensor:
    """The last parameter's input: the up projection(s) of ``x`` through the layout's gate."""
    up = [expert_linear(experts, layout, p, expert, x) for p in layout.up]
    if layout.gate == "module":
        return experts._apply_gate(up[0])
    act = _attribute(experts, layout.act)
    if layout.gate == "act":
        return act(up[0])
    if layout.gate == "chunk":
        gate, rest = up[0].chunk(2, dim=-1)
        return act(gate) * rest
    return act(up[0]) * up[1]  # "pair"


def expert_output(experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """What expert ``expert`` returns for the rows ``x`` it receives (before any routing weight is applied)."""
    layout = experts_layout(experts)
    if layout.gate == "none":
        return expert_linear(experts, layout, layout.params[0], expert, x)
    y = expert_linear(experts, layout, layout.params[-1], expert, expert_hidden(experts, layout, expert, x))
    return experts.post_expert_norm(y) if layout.post_norm else y


# ---------------------------------------------------------------- which rows reach each expert


def _call_values(experts: nn.Module, args: tuple, kwargs: Mapping[str, Any], count: int, form: str) -> list:
    """The first ``count`` arguments of one experts call, or a one-line error naming the expected ``form``."""
    values = list(inspect.signature(experts.forward).bind(*args, **kwargs).arguments.values())
    if len(values) < count or not isinstance(values[0], torch.Tensor):
        raise PrunekitError(
            f"{type(experts).__name__} was not called as {form}; prunekit cannot tell which tokens each expert sees"
        )
    return values[:count]


def routing_call(
    experts: nn.Module, args: tuple, kwargs: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden_states, top_k_index, top_k_weights)`` of one routed experts call, whatever the families name them
    (GPT-OSS: ``router_indices``, ``routing_weights``)."""
    values = _call_values(experts, args, kwargs, 3, "experts(hidden_states, top_k_index, top_k_weights)")
    if not all(isinstance(v, torch.Tensor) for v in values):
        raise PrunekitError(
            f"{type(experts).__name__} was not called as experts(hidden_states, top_k_index, top_k_weights); "
            "prunekit cannot tell which tokens each expert sees"
        )
    return values[0], values[1], values[2]


def routed_rows(top_k_index: torch.Tensor, expert: int) -> torch.Tensor:
    """Indices of the tokens that chose ``expert`` among their top k."""
    return (top_k_index == expert).any(dim=-1).nonzero().squeeze(1)


@dataclass
class Arrivals:
    """What one experts call hands its experts: ``rows(e)``, the rows expert ``e`` computes on; ``weights(e)``, the
    routing weight its output for each of them is scaled by (None: the rows already carry it, or the call does not
    say); ``every``, every token's hidden state when the call carries it (else the MoE block's input stands in);
    ``scales(e)``, a per-row factor ``[n, 1]`` on expert ``e``'s activated up projection (Inkling's gammas)."""

    rows: Callable[[int], torch.Tensor]
    weights: Callable[[int], torch.Tensor] | None = None
    every: torch.Tensor | None = None
    scales: Callable[[int], torch.Tensor] | None = None


def _routed(experts: nn.Module, layout: ExpertsLayout, args: tuple, kwargs: Mapping[str, Any]) -> Arrivals:
    hidden, index, weights = routing_call(experts, args, kwargs)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    index, weights = index.reshape(hidden.shape[0], -1), weights.reshape(hidden.shape[0], -1)

    def weight(e: int) -> torch.Tensor:
        hit = index == e
        return (weights * hit).sum(dim=-1)[hit.any(dim=-1)]

    return Arrivals(lambda e: hidden[routed_rows(index, e)], weight, hidden)


def _dispatched(experts: nn.Module, layout: ExpertsLayout, args: tuple, kwargs: Mapping[str, Any]) -> Arrivals:
    """Rows ``[experts * tokens, H]``, expert-major; a token the router did not send to ``e`` is a zero row in
    ``e``'s part (its score is 0), which that expert does not compute on."""
    (hidden,) = _call_values(experts, args, kwargs, 1, "experts(hidden_states [experts * tokens, hidden])")
    parts = hidden.reshape(num_experts(experts, layout), -1, hidden.shape[-1])
    return Arrivals(lambda e: parts[e][parts[e].ne(0).any(dim=-1)])


def _sized(experts: nn.Module, layout: ExpertsLayout, args: tuple, kwargs: Mapping[str, Any]) -> Arrivals:
    inputs, sizes = _call_values(experts, args, kwargs, 2, "experts(inputs sorted by expert, expert_size)")
    parts = inputs.reshape(-1, inputs.shape[-1]).split([int(s) for s in sizes])
    return Arrivals(lambda e: parts[e])


def _shared(experts: nn.Module, layout: ExpertsLayout, args: tuple, kwargs: Mapping[str, Any]) -> Arrivals:
    hidden, gammas = _call_values(experts, args, kwargs, 2, "experts(hidden_states, gammas [tokens, experts])")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    gammas = gammas.reshape(hidden.shape[0], -1)
    return Arrivals(lambda e: hidden, every=hidden, scales=lambda e: gammas[:, e : e + 1])


ARRIVALS: dict[str, Callable[..., Arrivals]] = {
    "routed": _routed,
    "dispatched": _dispatched,
    "sized": _sized,
    "shared": _shared,
}


def arrivals(experts: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> Arrivals:
    """The rows each expert of ``experts`` computes on in the call ``experts(*args, **kwargs)``."""
    layout = experts_layout(experts)
    return ARRIVALS[layout.call](experts, layout, args, kwargs)


# ---------------------------------------------------------------- calibration hooks

Feed = Callable[[str, torch.Tensor, int], None]  # (layer name, input rows [n, cols], batch items)


class _ExpertSite:
    """The selected expert views of one experts module: a pre-hook computes each one's input rows."""

    def __init__(self, views: list[tuple[str, ExpertWeight]], feed: Feed):
        self.views, self.feed = views, feed
        first = views[0][1]
        self.experts, self.layout, self.block, self.outer = first.experts, first.layout, first.block, first.outer
        self.samples, self.block_input = 1, None

    def register(self) -> list[RemovableHandle]:
        handles = [self.experts.register_forward_pre_hook(self.on_experts, with_kwargs=True)]
        for module in (self.outer, self.block):  # the outer module's hook runs first, the block's may refine it
            if module is not None:
                handles.append(module.register_forward_pre_hook(self.on_caller, with_kwargs=True))
        return handles

    def on_caller(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = hidden_state(args, kwargs) if args or kwargs else None
        if not isinstance(hidden, torch.Tensor):
            return
        if module is self.block:
            self.block_input = hidden
        if hidden.dim() > 2:
            self.samples = hidden.shape[0]
        elif module is self.outer or self.outer is None:
            self.samples = 1

    @torch.no_grad()
    def on_experts(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        arrived = ARRIVALS[self.layout.call](module, self.layout, args, kwargs)
        cache: dict[tuple, torch.Tensor] = {}
        for name, view in self.views:
            key = ("rows", view.index)
            if key not in cache:
                cache[key] = arrived.rows(view.index)
            view.routed_tokens += cache[key].shape[0]
            self.feed(name, self._input(view, arrived, cache), self.samples)

    def _every(self, arrived: Arrivals) -> torch.Tensor:
        """Every token's hidden state: from the call, else the MoE block's input (Llama 4: before the router's
        score scales a token's copy for each expert)."""
        every = arrived.every if arrived.every is not None else self.block_input
        if every is None:
            raise PrunekitError(
                f"expert_tokens='all': {type(self.experts).__name__} is not called with every token and no MoE block "
                "around it was; use expert_tokens='routed'"
            )
        return every.reshape(-1, every.shape[-1])

    def _input(self, view: ExpertWeight, arrived: Arrivals, cache: dict) -> torch.Tensor:
        """The view's input rows (shared by the views of one expert through ``cache``)."""
        kind = "up" if view.param in self.layout.up else "down"
        key = (view.index, view.tokens, kind)
        if key not in cache:
            x = self._every(arrived) if view.tokens == "all" else cache[("rows", view.index)]
            if kind == "down":
                x = expert_hidden(self.experts, self.layout, view.index, x)
                x = x if arrived.scales is None else x * arrived.scales(view.index)
            cache[key] = x
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
            row = counts.setdefault(experts_name(name, view), [None] * num_experts(view.experts, view.layout))
            row[view.index] = view.routed_tokens
    return counts


def few_tokens(layers: Mapping[str, Any], minimum: int) -> list[dict[str, Any]]:
    """The experts whose statistics came from fewer than ``minimum`` tokens (routed, or all with ``all``)."""
    low, seen = [], set()
    for name, view in expert_views(layers):
        module_name = experts_name(name, view)
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
