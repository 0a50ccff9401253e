"""``prunekit.prune``: the Python front end. Validates everything before any work, then runs the engine."""
from __future__ import annotations

import logging
import platform
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from . import engine
from .allocate import ALLOCATORS
from .collect import LayerStats
from .data.calib import calibration_batches
from .graph import find_blocks, select_layers, weight_matrix
from .groups import GROUP_NAMES, check_sparsity, parse_pattern
from .methods import METHODS, STRUCTURED, UPDATES, Target

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    """What was done: settings, per-layer sparsity, timings, versions. Saved as ``prune_report.json``."""

    settings: dict[str, Any]
    layers: dict[str, dict[str, Any]]
    sparsity: float
    timings: dict[str, float]
    versions: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    bn_recalibration: dict[str, Any] | None = None
    structure: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def versions() -> dict[str, str]:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("prunekit", "torch", "transformers", "timm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def layer_sparsity(layers: Mapping[str, nn.Module]) -> tuple[dict[str, dict[str, Any]], float]:
    """Per-layer and overall (parameter-weighted) fraction of exact zeros in the selected weights."""
    rows, zeros, total = {}, 0, 0
    for name, m in layers.items():
        w = m.weight.detach()
        z, n = int((w == 0).sum()), w.numel()
        rows[name] = {"shape": list(w.shape), "numel": n, "zeros": z, "sparsity": z / n}
        zeros, total = zeros + z, total + n
    return rows, zeros / max(total, 1)


def _resolve_group(group: str | None, method_cls, model: nn.Module) -> str:
    """The user's group, else per-layer for image models (the Wanda paper's finding for ConvNeXt/ViT),
    else the method's own default (per-output for Wanda on LLMs, per-layer for magnitude)."""
    from .io.timm import is_vision_model
    if group is None and is_vision_model(model):
        group = "per-layer"
    group = group or method_cls.default_group
    if group not in GROUP_NAMES:
        raise ValueError(f"unknown comparison group {group!r}; choose from {', '.join(GROUP_NAMES)}")
    return group


def _check_patterns(layers: Mapping[str, nn.Module], nm: tuple[int, int] | None) -> None:
    """Every layer N:M does not divide, in one error, so one --exclude list fixes them all."""
    if nm is None:
        return
    columns = {name: weight_matrix(m).shape[1] for name, m in layers.items()}
    bad = {name: cols for name, cols in columns.items() if cols % nm[1]}
    if bad:
        listed = ", ".join(f"{name} ({cols} columns)" for name, cols in bad.items())
        raise ValueError(f"{nm[0]}:{nm[1]} sparsity needs every layer's input dimension to be a multiple of {nm[1]}; "
                         f"these are not: {listed}; exclude them (--exclude) or pick another M")


def _block_index(name: str, blocks) -> int | None:
    if blocks is None:
        return None
    prefix = f"{blocks[0]}." if blocks[0] else ""
    rest = name[len(prefix):] if name.startswith(prefix) else None
    head = rest.split(".", 1)[0] if rest else ""
    return int(head) if head.isdigit() else None


def plan_prune(model: nn.Module, method: str = "wanda", sparsity: float = 0.5, pattern: str | None = None,
               group: str | None = None, update: str | Iterable[str] | None = None,
               method_params: dict | None = None, update_params: dict | None = None,
               include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
               layer_types: Iterable[str] = ("linear",), sequential: bool = True,
               device: str | torch.device | None = None) -> engine.Plan:
    """Resolve and validate settings into an engine plan (no calibration, no weight changes)."""
    sparsity = check_sparsity(sparsity)
    nm = parse_pattern(pattern)
    method_obj = METHODS.create(method, method_params)
    updates = [update] if isinstance(update, str) else list(update or [])
    update_objs = [UPDATES.create(u, (update_params or {}).get(u, update_params if len(updates) == 1 else None))
                   for u in updates]
    group = _resolve_group(group, type(method_obj), model)
    layers = select_layers(model, include, exclude, layer_types)
    if not layers:
        raise ValueError("no prunable layers selected: the model has no Linear/Conv layers matching the "
                         "include/exclude patterns and layer types; widen --include or use --layer-types all")
    _check_patterns(layers, nm)
    if group == "global" and method_obj.solver:
        raise ValueError(f"method {method!r} chooses its own masks; use group per-output/per-layer, not global")
    needs = frozenset(method_obj.needs).union(*(u.needs for u in update_objs))
    blocks = find_blocks(model) if sequential and group != "global" else None
    if blocks is not None and any(_block_index(n, blocks) is None for n in layers):
        log.warning("some selected layers are outside the block list %r: calibrating in one pass", blocks[0])
        blocks = None
    targets = {n: Target(sparsity, group, nm) for n in layers}
    return engine.Plan(method_obj, update_objs, layers, targets, blocks,
                       torch.device(device) if device is not None else None, needs)


def prune(model: nn.Module, method: str = "wanda", sparsity: float = 0.5, pattern: str | None = None,
          group: str | None = None, calib: Any = None, *, update: str | Iterable[str] | None = None,
          method_params: dict | None = None, update_params: dict | None = None,
          allocation: str = "uniform", allocation_params: dict | None = None,
          include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
          layer_types: Iterable[str] = ("linear",), sequential: bool = True,
          device: str | torch.device | None = None, tokenizer: Any = None, nsamples: int = 128,
          seqlen: int = 2048, seed: int = 0, batch_size: int = 8,
          recalibrate_bn: bool | None = None) -> PruneReport:
    """Prune ``model`` in place and return a report.

    ``calib`` is a LongTensor of token ids ``[nsamples, seqlen]``, an iterable / DataLoader of batches
    (tensors or dicts of model inputs), or a text file path (tokenised with ``tokenizer``). Methods that
    need no statistics (magnitude) need no ``calib``. Structured methods (``depth``, ``width``, ``slicegpt``)
    remove about ``sparsity`` of the selected parameters and change the model's shapes and config.
    ``recalibrate_bn``: re-estimate BatchNorm statistics after pruning on the calibration batches; ``None``
    (default) does it when a pruned layer feeds a BatchNorm and calibration data is given.
    """
    if method in STRUCTURED:
        return _prune_structured(model, method, sparsity, calib, method_params, tokenizer, nsamples, seqlen, seed,
                                 batch_size)
    settings = dict(method=method, sparsity=sparsity, pattern=pattern, group=group, update=update,
                    method_params=method_params or {}, update_params=update_params or {}, allocation=allocation,
                    allocation_params=allocation_params or {}, include=list(include or []),
                    exclude=list(exclude or []), layer_types=list(layer_types), sequential=sequential,
                    nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size)
    plan = plan_prune(model, method, sparsity, pattern, group, update, method_params, update_params, include,
                      exclude, layer_types, sequential, device)
    settings["group"] = next(iter(plan.targets.values())).group
    allocator = ALLOCATORS.create(allocation, allocation_params)
    start = time.perf_counter()
    wants_data = plan.needs or allocation != "uniform" or recalibrate_bn or calib is not None
    batches = calibration_batches(calib, tokenizer, nsamples, seqlen, seed, batch_size) if wants_data else []
    data_s = time.perf_counter() - start
    sparsities = _allocate(model, batches, plan, allocator, sparsity)
    plan.targets = {n: Target(sparsities[n], t.group, t.nm) for n, t in plan.targets.items()}
    was_training = model.training
    model.eval()
    try:
        timings = engine.run(model, batches, plan)
    finally:
        model.train(was_training)
    timings["data_s"] = data_s
    bn = _recalibrate_bn(model, plan, batches, recalibrate_bn)
    layers, overall = layer_sparsity(plan.layers)
    for name, row in layers.items():
        row["target"] = plan.targets[name].sparsity
    settings["blocks"] = plan.blocks[0] if plan.blocks else None
    log.info("pruned %d layers to %.2f%% sparsity in %.1fs", len(layers), 100 * overall, timings["total_s"])
    return PruneReport(settings, layers, overall, timings, versions(), bn_recalibration=bn)


def _recalibrate_bn(model: nn.Module, plan: engine.Plan, batches: list, wanted: bool | None) -> dict | None:
    """BatchNorm statistics go stale when the convs feeding them are pruned; re-estimate them."""
    from .bn import needs_bn_recalibration, recalibrate_bn
    if wanted is False:
        return None
    if wanted is None and not batches:
        if needs_bn_recalibration(model, plan.layers):
            log.warning("BatchNorm layers run after pruned layers, but without calibration data their running "
                        "statistics cannot be re-estimated and are now stale; pass calib=... (--calib-data) to "
                        "recalibrate them, or recalibrate_bn=False (--no-recalibrate-bn) to keep them as they are")
        return None
    if wanted is None and not needs_bn_recalibration(model, plan.layers, batches[0], plan.device):
        return None
    start = time.perf_counter()
    result = recalibrate_bn(model, batches, plan.device)
    result["seconds"] = time.perf_counter() - start
    return result


def _prune_structured(model: nn.Module, method: str, ratio: float, calib: Any, params: dict | None,
                      tokenizer: Any, nsamples: int, seqlen: int, seed: int, batch_size: int) -> PruneReport:
    """Structural methods change shapes and config; they get the calibration batches and a ratio."""
    method_obj = STRUCTURED.create(method, params)
    check_sparsity(ratio)
    start = time.perf_counter()
    batches = calibration_batches(calib, tokenizer, nsamples, seqlen, seed, batch_size) \
        if method_obj.needs_calibration else []
    with torch.no_grad():
        summary = method_obj.prune_model(model, batches, ratio)
    settings = dict(method=method, sparsity=ratio, method_params=params or {}, nsamples=nsamples, seqlen=seqlen,
                    seed=seed, batch_size=batch_size, structured=True)
    timings = {"total_s": time.perf_counter() - start}
    return PruneReport(settings, {}, 0.0, timings, versions(), structure=summary)

def _allocate(model, batches, plan: engine.Plan, allocator, sparsity: float) -> dict[str, float]:
    if plan.targets and next(iter(plan.targets.values())).nm is not None:
        return {n: sparsity for n in plan.layers}  # N:M fixes every layer's sparsity

    def dense_stats() -> Mapping[str, LayerStats]:
        if not batches:
            raise ValueError("this allocation needs calibration data (calib=...)")
        return engine.dense_statistics(model, batches, plan)

    block_of = {n: _block_index(n, plan.blocks) for n in plan.layers}
    return allocator.plan(plan.layers, sparsity, block_of, dense_stats)
