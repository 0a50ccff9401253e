"""``prunekit.prune``: the Python front end. Takes a ``PruneConfig`` (or its settings as keywords), checks
what needs the model before any work, then runs the engine."""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from . import engine
from .allocate import ALLOCATORS, Allocator
from .collect import LayerStats
from .config import PruneConfig, refuse_unused
from .coverage import block_coverage
from .data.calib import calibration_batches
from .distributed import check_launch, rank_device, shard, together, world_size
from .errors import PrunekitError
from .forward import eval_mode, model_device, on_device
from .graph import find_stacks, input_embeddings, is_vision_model, select_layers, stack_block_index, weight_matrix
from .groups import GLOBAL, parse_pattern
from .masks import count_zeros
from .methods import METHODS, UPDATES, Target
from .moe import calibrated_on, expert_report

log = logging.getLogger(__name__)

DEFAULT_SEQLEN = 2048


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
    coverage: dict[str, Any] | None = None  # sparsity over every weight inside the blocks (``coverage.py``)
    experts: dict[str, Any] | None = None  # MoE: routed tokens per expert, few-token experts, dense routers
    search: dict[str, Any] | None = None  # a quality-target search: the bound and every trial (``prunekit.target``)

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
        w = m.weight
        n, z = w.numel(), count_zeros(w)
        rows[name] = {"shape": list(w.shape), "numel": n, "zeros": z, "sparsity": z / n}
        zeros, total = zeros + z, total + n
    return rows, zeros / max(total, 1)


# ---------------------------------------------------------------- the plan: config resolved against a model


def resolve_group(group: str | None, method_cls: type, model: nn.Module) -> str:
    """The user's group, else per-layer for image models (the Wanda paper's finding for ConvNeXt/ViT),
    else the method's own default (per-output for Wanda on LLMs, per-layer for magnitude)."""
    if group is None and is_vision_model(model):
        group = "per-layer"
    return group or method_cls.default_group


def check_patterns(layers: Mapping[str, nn.Module], nm: tuple[int, int] | None) -> None:
    """Every layer N:M does not divide, in one error, so one --exclude list fixes them all."""
    if nm is None:
        return
    columns = {name: weight_matrix(m).shape[1] for name, m in layers.items()}
    bad = {name: cols for name, cols in columns.items() if cols % nm[1]}
    if bad:
        listed = ", ".join(f"{name} ({cols} columns)" for name, cols in bad.items())
        raise PrunekitError(
            f"{nm[0]}:{nm[1]} sparsity needs every layer's input dimension to be a multiple of "
            f"{nm[1]}; these are not: {listed}; exclude them (--exclude) or pick another M"
        )


def plan_prune(model: nn.Module, config: PruneConfig | str | None = None, **settings: Any) -> engine.Plan:
    """Resolve ``config`` against ``model`` into an engine plan (no calibration, no weight changes)."""
    config = PruneConfig.of(config, **settings)
    if config.structured:
        raise PrunekitError(f"{config.method!r} is a structured method: it has no layer-by-layer plan")
    method = METHODS.create(config.method, config.method_params)
    updates = tuple(UPDATES.create(u, config.update_params.get(u)) for u in config.update)
    group = resolve_group(config.group, type(method), model)
    nm = parse_pattern(config.pattern)
    layers = select_layers(model, config.include, config.exclude, config.layer_types)
    layers = calibrated_on(layers, config.expert_tokens)
    if not layers:
        raise PrunekitError(
            "no prunable layers selected: the model has no Linear/Conv layers matching the "
            "include/exclude patterns and layer types; widen --include or use --layer-types all"
        )
    check_patterns(layers, nm)
    needs = frozenset(method.needs).union(*(u.needs for u in updates))
    targets = {n: Target(config.sparsity, group, nm) for n in layers}
    device = rank_device(config.device)
    return engine.Plan(
        method, updates, layers, targets, _stacks(model, config, group), device, needs, config.as_config()
    )


def _stacks(model: nn.Module, config: PruneConfig, group: str) -> tuple:
    """The block lists to calibrate sequentially; none for one pass (asked, or a global threshold, which needs
    every layer's scores at once)."""
    if not config.sequential or group == GLOBAL:
        return ()
    return find_stacks(model, config.blocks)


# ---------------------------------------------------------------- pruning


def prune(
    model: nn.Module,
    config: PruneConfig | str | None = None,
    sparsity: float | None = None,
    pattern: str | None = None,
    group: str | None = None,
    calib: Any = None,
    *,
    tokenizer: Any = None,
    **settings: Any,
) -> PruneReport:
    """Prune ``model`` in place and return a report.

    ``config`` is a ``PruneConfig`` or a method name; any setting of ``PruneConfig`` may also be given as a
    keyword (``prune(model, "wanda", 0.5, calib=tokens, update="admm")``) and overrides the config.
    ``calib`` is a LongTensor of token ids ``[nsamples, seqlen]``, an iterable / DataLoader of batches
    (tensors or dicts of model inputs), or a text file path (tokenised with ``tokenizer``; ``nsamples`` windows of
    ``seqlen`` tokens drawn with ``seed``). Methods that need no statistics (magnitude) need no ``calib``.
    Structured methods (``depth``, ``width``, ``slicegpt``) remove about ``sparsity`` of the selected parameters
    and change the model's shapes and config. Settings that cannot apply here are refused (``PYTHON_UNUSED``).

    Inside an initialised ``torch.distributed`` process group every rank calls ``prune`` with the same model,
    settings and calibration data: each calibrates on its share of the batches, the statistics are summed over
    the ranks and the layers' pruning is shared out (``prunekit.distributed``), so every rank ends with the same
    pruned model.
    """
    config = PruneConfig.of(config, sparsity=sparsity, pattern=pattern, group=group, **settings)
    unused = python_unused(calib)
    used = [f.name for f in dataclasses.fields(config) if f.name not in unused]
    refuse_unused(config, used, "prunekit.prune", PYTHON_UNUSED_WHY)
    return prune_model(model, config, calib, tokenizer)


# What ``prunekit.prune`` cannot use: the model is already loaded (``dtype`` is how prunekit loads a checkpoint),
# and calibration given as batches is already drawn (``nsamples``, ``seqlen``, ``seed`` draw windows from text).
PYTHON_UNUSED_WHY = (
    "the model passed in is already loaded (cast it yourself: model.to(torch.bfloat16)), and calibration given as "
    "token ids or batches is already drawn (nsamples, seqlen and seed draw windows from a text path)"
)


def python_unused(calib: Any) -> set[str]:
    drawn = {"nsamples", "seqlen", "seed"} if calib is not None and not isinstance(calib, (str, os.PathLike)) else set()
    return {"dtype", *drawn}


def prune_model(
    model: nn.Module,
    config: PruneConfig,
    calib: Any = None,
    tokenizer: Any = None,
    resume: engine.Resume | None = None,
) -> PruneReport:
    """The work behind every front end that holds the model in memory (``prune``, the CLI, fine-tuning).
    ``resume`` keeps a resumable run's progress block by block (the CLI's ``--out``: ``io.resume.InMemoryResume``)."""
    check_model(model)
    check_launch()
    with eval_mode(model):
        if config.structured:
            if resume is not None:
                resume.bind(None, resumable=False)
            return _prune_structured(model, config, calib, tokenizer)
        return _prune_unstructured(model, config, calib, tokenizer, resume)


def _prune_unstructured(
    model: nn.Module, config: PruneConfig, calib: Any, tokenizer: Any, resume: engine.Resume | None = None
) -> PruneReport:
    plan = plan_prune(model, config)
    allocator = ALLOCATORS.create(config.allocation, config.allocation_params)
    start = time.perf_counter()
    wants_data = plan.needs or allocator.needs_calibration or config.recalibrate_bn or calib is not None
    with together():
        batches = model_batches(model, calib, tokenizer, config) if wants_data else []
        plan = engine.chained(model, plan, batches)
        plan, uncalled = _without_uncalled(model, plan, batches if plan.needs or allocator.needs_calibration else [])
    data_s = time.perf_counter() - start
    saved = resume.targets if resume is not None else None  # a resumed run keeps its allocation
    plan = replace(plan, targets=saved or allocate(model, batches, plan, allocator, config.sparsity))
    if saved is None:
        warn_existing_zeros(plan)
    if resume is not None:
        resume = resume.bind(plan, engine.resumable(plan))
    timings = engine.run(model, batches, plan, resume)
    timings["data_s"] = data_s
    bn = _recalibrate_bn(model, plan, batches, config.recalibrate_bn)
    rows = layer_sparsity(plan.layers)[0]
    report = unstructured_report(
        config,
        plan,
        rows,
        timings,
        coverage=_coverage(model, plan, uncalled),
        experts=expert_report(model, plan.layers, config.expert_tokens, config.expert_min_tokens),
        seqlen=window_length(batches),
        bn_recalibration=bn,
    )
    log.info("pruned %d layers to %.2f%% sparsity in %.1fs", len(rows), 100 * report.sparsity, timings["total_s"])
    return with_ranks(report)


def with_ranks(report: PruneReport) -> PruneReport:
    """The number of ranks in the report, when there were several."""
    if world_size() > 1:
        report.metrics["world_size"] = world_size()
    return report


def unstructured_report(
    config: PruneConfig,
    plan: engine.Plan,
    rows: dict[str, dict[str, Any]],
    timings: dict[str, float],
    *,
    seqlen: int | None,
    job: Mapping[str, Any] | None = None,
    **parts: Any,
) -> PruneReport:
    """The report of a mask-and-update run, in memory or lazy: the settings as resolved (group, block lists, the
    calibration windows' length actually used), per-layer rows with their targets, overall sparsity, and the
    report's other ``parts`` (coverage, experts, metrics, bn_recalibration)."""
    for name, row in rows.items():
        row["target"] = plan.targets[name].sparsity
    zeros, total = sum(r["zeros"] for r in rows.values()), sum(r["numel"] for r in rows.values())
    settings = {
        **config.settings(),
        **(job or {}),
        "group": next(iter(plan.targets.values())).group,
        "blocks": ",".join(prefix for prefix, _ in plan.stacks) or None,
        "seqlen": seqlen if seqlen is not None else config.seqlen,
    }
    return PruneReport(settings, rows, zeros / max(total, 1), timings, versions(), **parts)


def window_length(batches: Sequence[Any]) -> int | None:
    """Tokens per calibration window, read off the batches (None for image batches or without calibration)."""
    if not batches:
        return None
    first = batches[0]
    ids = first.get("input_ids") if isinstance(first, Mapping) else first
    if isinstance(ids, (tuple, list)) and ids:
        ids = ids[0]
    if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.dim() >= 1:
        return int(ids.shape[-1])
    return None


def _coverage(model: nn.Module, plan: engine.Plan, uncalled: dict[str, str]) -> dict[str, Any]:
    """``block_coverage``, with the layers no calibration input reached named as such (inside the blocks or not)."""
    coverage = block_coverage(model, plan.layers, reasons=uncalled)
    if uncalled:
        coverage["never_called"] = sorted(uncalled)
    return coverage


def _without_uncalled(model: nn.Module, plan: engine.Plan, batches: list) -> tuple[engine.Plan, dict[str, str]]:
    """The plan without the selected layers no calibration input reaches (``engine.uncalled``): they stay dense,
    with their reason in the report's coverage."""
    uncalled = engine.uncalled(model, plan, batches)
    if not uncalled:
        return plan, {}
    if len(uncalled) == len(plan.layers):
        raise PrunekitError(f"{next(iter(uncalled.values()))}, nor any other selected layer; check --include")
    log.warning(
        "%d selected layer(s) left dense: %s; prune them without calibration data (--method magnitude --include "
        "NAME) if they should be sparse",
        len(uncalled),
        next(iter(uncalled.values())),
    )
    layers = {n: m for n, m in plan.layers.items() if n not in uncalled}
    return replace(plan, layers=layers, targets={n: plan.targets[n] for n in layers}), uncalled


def _prune_structured(model: nn.Module, config: PruneConfig, calib: Any, tokenizer: Any) -> PruneReport:
    """Structural methods change shapes and config; they get the calibration batches and a ratio."""
    from .structured import STRUCTURED

    method = STRUCTURED.create(config.method, config.method_params)
    start = time.perf_counter()
    with together():
        batches = model_batches(model, calib, tokenizer, config) if method.needs_calibration else []
    with torch.no_grad(), on_device(model, rank_device(config.device)):
        summary = method.prune_model(model, batches, config.sparsity)
    seqlen = window_length(batches)
    settings = {**config.settings(), "structured": True, "seqlen": seqlen if seqlen is not None else config.seqlen}
    timings = {"total_s": time.perf_counter() - start}
    return with_ranks(PruneReport(settings, {}, 0.0, timings, versions(), structure=summary))


def allocate(
    model: nn.Module, batches: list, plan: engine.Plan, allocator: Allocator, sparsity: float
) -> dict[str, Target]:
    """Each layer's target after the allocation (an N:M pattern fixes every layer's sparsity)."""
    if next(iter(plan.targets.values())).nm is not None:
        return dict(plan.targets)

    def dense_stats() -> Mapping[str, LayerStats]:
        return engine.dense_statistics(model, batches, plan)

    block_of = {n: stack_block_index(n, plan.stacks) for n in plan.layers}
    sparsities = allocator.plan(plan.layers, sparsity, block_of, dense_stats)
    return {n: replace(t, sparsity=sparsities[n]) for n, t in plan.targets.items()}


def warn_existing_zeros(plan: engine.Plan) -> None:
    """Pruning an already sparser layer keeps its zeros (they score lowest): say so rather than surprise."""
    sparser = [
        n
        for n, m in plan.layers.items()
        if count_zeros(m.weight) / max(m.weight.numel(), 1) > plan.targets[n].sparsity + 1e-6
    ]
    if sparser:
        log.warning(
            "%d selected layer(s) already hold more zeros than their target (e.g. %s); their zeros stay, so "
            "they end sparser than asked",
            len(sparser),
            sparser[0],
        )


def _recalibrate_bn(model: nn.Module, plan: engine.Plan, batches: list, wanted: bool | None) -> dict | None:
    """BatchNorm statistics go stale when the convs feeding them are pruned; re-estimate them."""
    from .bn import needs_bn_recalibration, recalibrate_bn

    if wanted is False:
        return None
    if wanted is None and not batches:
        if needs_bn_recalibration(model, plan.layers):
            log.warning(
                "BatchNorm layers run after pruned layers, but without calibration data their running "
                "statistics cannot be re-estimated and are now stale; pass calib=... (--calib-data) to "
                "recalibrate them, or recalibrate_bn=False (--no-recalibrate-bn) to keep them as they are"
            )
        return None
    if wanted is None and not needs_bn_recalibration(model, plan.layers, batches[0], plan.device):
        return None
    start = time.perf_counter()
    result = recalibrate_bn(model, batches, plan.device)
    result["seconds"] = time.perf_counter() - start
    return result


# ---------------------------------------------------------------- calibration data and the model


def context_length(model: Any) -> int | None:
    """The longest sequence the model (or its HF config) takes (``max_position_embeddings``), None when it
    does not say."""
    config = getattr(model, "config", model)
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def resolve_seqlen(seqlen: int | None, model: Any, what: str = "seqlen") -> int:
    """``seqlen``, or ``min(2048, context length)`` when unset; above the context length is an error."""
    context = context_length(model)
    if seqlen is None:
        return min(DEFAULT_SEQLEN, context) if context else DEFAULT_SEQLEN
    if context is not None and seqlen > context:
        raise PrunekitError(
            f"{what} {seqlen} is longer than the model's context of {context} tokens "
            f"(max_position_embeddings); use {what} <= {context}"
        )
    return seqlen


def model_batches(model: nn.Module, calib: Any, tokenizer: Any, config: PruneConfig) -> list:
    """The calibration batches of ``calib`` for ``model`` (text windows of the resolved length); with several
    ranks, this rank's share of them (``prunekit.distributed.shard``)."""
    seqlen = resolve_seqlen(config.seqlen, model)
    batches = calibration_batches(calib, tokenizer, config.nsamples, seqlen, config.seed, config.batch_size)
    batches = shard(batches)
    check_token_batches(model, batches)
    return batches


def check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise PrunekitError(f"prune() takes a torch.nn.Module, got {type(model).__name__}")
    if model_device(model).type == "meta":
        raise PrunekitError(
            "the model's weights are on the meta device (not loaded); load real weights first, "
            "or prune the checkpoint with prunekit.io.lazy.prune_lazy / --lazy"
        )


def check_token_batches(model: nn.Module, batches: list) -> None:
    """Token-id batches must be integers inside the vocabulary: a raw embedding error deep inside the model
    says neither."""
    embed = input_embeddings(model)
    if not isinstance(embed, nn.Embedding):
        return
    for batch in batches:
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
        if not isinstance(ids, torch.Tensor):
            continue
        if ids.is_floating_point():
            raise PrunekitError(f"calibration token ids are {ids.dtype}; pass integer ids (a LongTensor)")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= embed.num_embeddings):
            raise PrunekitError(
                f"calibration token ids range over [{int(ids.min())}, {int(ids.max())}] but the "
                f"vocabulary has {embed.num_embeddings} tokens; tokenize with the model's tokenizer"
            )
