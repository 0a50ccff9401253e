"""Sensitivity scan: how much the model's metric suffers when one part of it alone is pruned.

A part is a block (decoder layer, ViT block, ConvNeXt stage) or, with ``granularity="kinds"``, one kind of layer
within a block (``self_attn.q_proj``, ``mlp.down_proj``; the same layer of every sub-block of a CNN stage); a
selected layer outside every block is a part of its own. Each trial prunes one part at one sparsity with the
chosen method while the rest of the model stays dense, evaluates the model, and restores the part's dense weights
(and BatchNorm statistics) exactly.

Pruning a part while everything before it is dense sees the same inputs the dense model gives it, so the input
statistics are collected once, on the dense model, block by block (``engine.dense_statistics``), and every trial
scores and masks its part from them: a trial costs one part's mask and one evaluation, not a calibration pass.
The scan feeds the ``sensitivity`` allocation (``prunekit.allocate``), which spends a global sparsity budget
where it hurts least.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import engine
from .allocate import SCAN_FORMAT, scan_damages
from .api import _recalibrate_bn, check_model, model_batches, plan_prune, versions
from .bn import batchnorm_layers
from .config import PruneConfig
from .errors import PrunekitError
from .forward import eval_mode
from .graph import Stack, block_index, set_weight_matrix, stack_block_index, weight_matrix
from .metrics import METRICS, dense_value, primary_metric
from .recipe import SCAN_PARTS, check_scan

log = logging.getLogger(__name__)

GRANULARITIES = SCAN_PARTS

Evaluate = Callable[[nn.Module], Mapping[str, float]]


@dataclass(frozen=True)
class Part:
    """What one trial prunes: its layers, their weight count, and the block it lives in (None outside blocks)."""

    name: str
    layers: tuple[str, ...]
    params: int
    block: int | None = None


@dataclass
class Scan:
    """A scan's measurements: ``results[i][j]`` holds every metric with part ``i`` alone at ``sparsities[j]``."""

    metric: str  # the metric the table and plot show
    dense: dict[str, float]
    sparsities: list[float]
    granularity: str
    parts: list[Part]
    results: list[list[dict[str, float]]]
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": SCAN_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "scan") -> Scan:
        if not isinstance(data, Mapping) or data.get("kind") != SCAN_FORMAT:
            raise PrunekitError(f"{source} is not a prunekit sensitivity scan (a scan's sensitivity.json)")
        fields = {k: v for k, v in data.items() if k != "kind"}
        parts = [Part(p["name"], tuple(p["layers"]), int(p["params"]), p.get("block")) for p in fields.pop("parts")]
        return cls(parts=parts, **fields)

    def damages(self, name: str | None = None) -> list[list[float]]:
        """Per part and sparsity, how much worse than dense ``name`` (default: the smoothest measured) is."""
        return scan_damages(self.to_dict(), name)


# ---------------------------------------------------------------- parts


def _within_block(name: str, stacks: Sequence[Stack]) -> str | None:
    """``name`` relative to its block (``self_attn.q_proj``), None outside every block."""
    for prefix, blocks in stacks:
        index = block_index(name, (prefix, blocks))
        if index is not None:
            child = list(dict(blocks.named_children()))[index]
            return name[len(f"{prefix}.{child}." if prefix else f"{child}.") :]
    return None


INDEX = re.compile(r"(?<![^.])\d+(?![^.])")  # a dotted component that is a number; the first one indexes sub-blocks


def _block_path(name: str, relative: str) -> str:
    return name[: -len(relative) - 1]


def scan_parts(layers: Mapping[str, nn.Module], stacks: Sequence[Stack], granularity: str = "blocks") -> list[Part]:
    """The parts a scan prunes one at a time, in layer order. ``kinds`` groups a block's layers by their name
    inside the block with its first index as ``*`` (a CNN stage's ``blocks.*.mlp.fc1``, a MoE layer's experts)."""
    if granularity not in GRANULARITIES:
        raise PrunekitError(f"unknown scan granularity {granularity!r}; choose from {', '.join(GRANULARITIES)}")
    groups: dict[str, list[str]] = {}
    blocks: dict[str, int | None] = {}
    for name in layers:
        relative = _within_block(name, stacks)
        if relative is None:
            key = name
        elif granularity == "blocks":
            key = _block_path(name, relative)
        else:
            key = f"{_block_path(name, relative)}: {INDEX.sub('*', relative, count=1)}"
        groups.setdefault(key, []).append(name)
        blocks[key] = stack_block_index(name, tuple(stacks))
    return [
        Part(key, tuple(names), sum(weight_matrix(layers[n]).numel() for n in names), blocks[key])
        for key, names in groups.items()
    ]


# ---------------------------------------------------------------- trials


@contextmanager
def restored(model: nn.Module, layers: Mapping[str, nn.Module]) -> Iterator[None]:
    """The weights of ``layers`` and every BatchNorm's running statistics put back exactly on exit."""
    weights = {n: weight_matrix(m).detach().clone() for n, m in layers.items()}
    buffers = [b for m in batchnorm_layers(model).values() for b in m.buffers()]
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for name, module in layers.items():
                set_weight_matrix(module, weights[name])
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


def prune_part(
    model: nn.Module,
    part: Part,
    sparsity: float,
    plan: engine.Plan,
    stats: Mapping[str, Any] | None,
    batches: list,
) -> None:
    """Prune ``part`` alone to ``sparsity`` from the dense statistics ``stats`` (BatchNorm recalibrated as the
    config says)."""
    layers = {n: plan.layers[n] for n in part.layers}
    targets = {n: replace(plan.targets[n], sparsity=sparsity) for n in layers}
    engine.prune_layers(layers, stats, replace(plan, layers=layers, targets=targets))
    _recalibrate_bn(model, replace(plan, layers=layers), batches, plan.config.recalibrate_bn)


@torch.no_grad()
def sensitivity(
    model: nn.Module,
    config: PruneConfig | str | None = None,
    calib: Any = None,
    evaluate: Evaluate | None = None,
    *,
    sparsities: Sequence[float] = (0.5, 0.7, 0.9),
    granularity: str = "blocks",
    tokenizer: Any = None,
    progress: bool = True,
    **settings: Any,
) -> Scan:
    """Scan ``model``: each part alone pruned at each of ``sparsities`` (the rest dense), scored by
    ``evaluate(model) -> {metric: value}``. ``config``/``settings``/``calib``/``tokenizer`` as for
    ``prunekit.prune``. The model is left exactly as it was."""
    config = PruneConfig.of(config, **settings)
    sparsities = [float(s) for s in sparsities]
    check_scan(config, sparsities)
    if evaluate is None:
        raise PrunekitError("a sensitivity scan needs evaluate=: a function model -> {metric: value}")
    check_model(model)
    start = time.perf_counter()
    with eval_mode(model):
        plan = plan_prune(model, config)
        parts = scan_parts(plan.layers, plan.stacks, granularity)
        wants_data = plan.needs or config.recalibrate_bn or (calib is not None and config.recalibrate_bn is None)
        batches = model_batches(model, calib, tokenizer, config) if wants_data else []
        plan = engine.chained(model, plan, batches)
        stats = engine.dense_statistics(model, batches, plan, plan.needs) if plan.needs else None
        timings = {"statistics_s": time.perf_counter() - start}
        dense = dict(evaluate(model))
        timings["dense_eval_s"] = time.perf_counter() - start - timings["statistics_s"]
        results = _trials(model, parts, sparsities, plan, stats, batches, evaluate, progress)
    timings["total_s"] = time.perf_counter() - start
    metric = primary_metric(results[0][0] if results and results[0] else dense)
    settings_out = {**config.settings(), "group": next(iter(plan.targets.values())).group}
    return Scan(metric, dense, sparsities, granularity, parts, results, settings_out, timings, versions())


def _trials(model, parts, sparsities, plan, stats, batches, evaluate: Evaluate, progress: bool) -> list[list[dict]]:
    off = {} if progress else {"disable": True}  # leave the default (and TQDM_DISABLE) alone unless asked
    bar = tqdm(total=len(parts) * len(sparsities), desc="sensitivity", unit="trial", **off)
    results = []
    with bar:
        for part in parts:
            row = []
            for sparsity in sparsities:
                bar.set_postfix_str(f"{part.name} @ {sparsity:g}", refresh=False)
                with restored(model, {n: plan.layers[n] for n in part.layers}):
                    prune_part(model, part, sparsity, plan, stats, batches)
                    row.append(dict(evaluate(model)))
                log.info("sensitivity: %s at %.2f -> %s", part.name, sparsity, row[-1])
                bar.update()
            results.append(row)
    return results


# ---------------------------------------------------------------- output: table and heat map


def table_rows(scan: Scan) -> tuple[list[str], list[list[str]]]:
    """Header and rows: each part with its parameter count and the metric at each sparsity."""
    header = ["part", "params", *(f"{scan.metric} @ {s:g}" for s in scan.sparsities)]
    rows = [
        [part.name, f"{part.params:,}", *(_fmt(r.get(scan.metric)) for r in results)]
        for part, results in zip(scan.parts, scan.results)
    ]
    return header, rows


def markdown(scan: Scan) -> str:
    header, rows = table_rows(scan)
    dense = dense_value(scan.metric, scan.dense)
    lines = [
        f"Sensitivity of {scan.metric} (dense {_fmt(dense)}): each part pruned alone with "
        f"{scan.settings.get('method')} ({scan.settings.get('group')}), the rest dense.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def plot(scan: Scan, path: str | Path) -> Path:
    """A heat map: parts down, sparsities across, each cell coloured by the damage to the metric (log scale for
    perplexities) and labelled with the metric's value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    damages = torch.tensor(scan.damages(scan.metric), dtype=torch.float64).clamp_min(0).numpy()
    fig = Figure(figsize=(2.2 + 1.1 * len(scan.sparsities), 1.2 + 0.32 * len(scan.parts)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(damages, cmap="magma_r", aspect="auto")
    for i, rows in enumerate(scan.results):
        for j, row in enumerate(rows):
            dark = damages[i, j] > 0.6 * max(damages.max(), 1e-12)
            ax.text(j, i, _fmt(row.get(scan.metric)), ha="center", va="center", fontsize=7, color="w" if dark else "k")
    ax.set_xticks(range(len(scan.sparsities)), [f"{s:g}" for s in scan.sparsities])
    ax.set_yticks(range(len(scan.parts)), [p.name for p in scan.parts], fontsize=7)
    ax.set_xlabel("sparsity of the part alone")
    what = "log(value / dense)" if METRICS[scan.metric].damage == "ratio" else "change from dense (worse > 0)"
    fig.colorbar(image, ax=ax, label=f"{scan.metric}: {what}")
    ax.set_title(f"{scan.metric} sensitivity (dense {_fmt(dense_value(scan.metric, scan.dense))})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
