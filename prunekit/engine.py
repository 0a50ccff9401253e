"""The calibration engine: one loop for every method.

Sequential (the published Wanda/SparseGPT protocol): capture the inputs of block 0 and the keyword
arguments blocks need (attention mask, rotary embeddings, ...), then for each block: collect statistics
on the dense block, prune it, re-run the calibration inputs through the pruned block and feed those
outputs to the next block. Only the current block has to sit on the compute device.
Models without a block list (or runs that need every layer at once, like a global threshold) get one
calibration pass over the whole model.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .collect import LayerStats, collect
from .graph import block_layers, num_groups, set_weight_matrix, weight_matrix
from .groups import select_global
from .methods import HESSIAN, Method, Target, Update, mask_from_scores

log = logging.getLogger(__name__)

Batch = torch.Tensor | Mapping[str, torch.Tensor]


@dataclass
class Plan:
    """Everything the engine needs, resolved and validated by the front end (``prunekit.api``)."""

    method: Method
    updates: list[Update]
    layers: dict[str, nn.Module]
    targets: dict[str, Target]
    blocks: tuple[str, nn.Module] | None = None
    device: torch.device | None = None
    needs: frozenset[str] = field(default_factory=frozenset)


# ---------------------------------------------------------------- layer level (pure tensor work)

def prune_matrix(weight: torch.Tensor, stats: LayerStats | None, groups: int, method: Method,
                 updates: Sequence[Update], target: Target,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one ``[rows, cols]`` float32 matrix; conv groups are pruned as the separate matmuls they are.

    ``mask`` is given when the mask was chosen across layers (global group); otherwise it comes from the
    method (solver) or from the method's scores within the target's comparison group.
    Returns the new weight (zeros where pruned) and the keep mask.
    """
    chunks = weight.split(weight.shape[0] // groups)
    group_stats = [stats.group(g) if stats is not None else None for g in range(groups)]
    if mask is None and method.solver:
        pieces = [method.prune(w, s, target) for w, s in zip(chunks, group_stats)]
        chunks, masks = [p[0] for p in pieces], [p[1] for p in pieces]
        mask = torch.cat(masks)
    elif mask is None:
        mask = mask_from_scores(score_matrix(weight, stats, groups, method), target)
    masks = list(mask.split(weight.shape[0] // groups))
    for update in updates:
        pieces = [update.update(w, m, s, target) for w, m, s in zip(chunks, masks, group_stats)]
        chunks, masks = [p[0] for p in pieces], [p[1] for p in pieces]
    mask = torch.cat(masks)
    return torch.cat(chunks) * mask, mask


def score_matrix(weight: torch.Tensor, stats: LayerStats | None, groups: int, method: Method) -> torch.Tensor:
    chunks = weight.split(weight.shape[0] // groups)
    return torch.cat([method.score(w, stats.group(g) if stats is not None else None)
                      for g, w in enumerate(chunks)])


@torch.no_grad()
def prune_layers(layers: Mapping[str, nn.Module], stats: Mapping[str, LayerStats] | None, plan: Plan) -> None:
    """Prune ``layers`` in place (a block's worth, or the whole model)."""
    global_masks = _global_masks(layers, stats, plan)
    for name, module in layers.items():
        layer_stats = stats[name] if stats is not None else None
        if layer_stats is not None:
            layer_stats.check_finite(name)
        weight = weight_matrix(module).detach().float()
        new, _ = prune_matrix(weight, layer_stats, num_groups(module), plan.method, plan.updates,
                              plan.targets[name], global_masks.get(name))
        set_weight_matrix(module, new)


def _global_masks(layers, stats, plan: Plan) -> dict[str, torch.Tensor]:
    if not any(plan.targets[n].group == "global" and plan.targets[n].nm is None for n in layers):
        return {}
    scores = {n: score_matrix(weight_matrix(m).detach().float(), stats[n] if stats else None, num_groups(m),
                              plan.method) for n, m in layers.items()}
    return select_global(scores, plan.targets[next(iter(layers))].sparsity)


# ---------------------------------------------------------------- running data through the model

class _StopForward(Exception):
    pass


def model_inputs(batch: Batch, device: torch.device | None) -> tuple[tuple, dict]:
    """A calibration batch as ``(args, kwargs)`` for ``model(...)``, on ``device``."""
    if isinstance(batch, Mapping):
        return (), {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(_to(v, device) for v in batch), {}
    return (_to(batch, device),), {}


def _to(value, device):
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def run_model(model: nn.Module, batch: Batch, device: torch.device | None) -> None:
    args, kwargs = model_inputs(batch, device)
    if _accepts_use_cache(model):
        kwargs.setdefault("use_cache", False)
    model(*args, **kwargs)


def _accepts_use_cache(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "use_cache")


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: Sequence[Batch],
                         device: torch.device | None) -> list[tuple[tuple, dict]]:
    """Run the model up to block 0 for every batch and keep what block 0 received (args, kwargs)."""
    captured = []

    def catch(module, args, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}
        captured.append((args, kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            try:
                run_model(model, batch, device)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError("the first block was not reached by every calibration batch; the block list found "
                           "is not on the model's forward path (pass sequential=False)")
    return captured


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_input(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    key = next(iter(kwargs))  # blocks called with keywords only: the first keyword is the hidden state
    return args, {**kwargs, key: hidden}


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    return [_block_output(block(*args, **kwargs)) for args, kwargs in inputs]


# ---------------------------------------------------------------- the two loops

@contextmanager
def on_device(module: nn.Module, device: torch.device | None):
    """Onload ``module`` to the compute device for the duration, then put it back where it was."""
    if device is None:
        yield module
        return
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


def _stats_context(layers, plan: Plan):
    if not plan.needs:
        return nullcontext(None)
    return collect(layers, hessian=HESSIAN in plan.needs)


@torch.no_grad()
def prune_sequential(model: nn.Module, batches: Sequence[Batch], plan: Plan,
                     timings: dict[str, float]) -> None:
    prefix, blocks = plan.blocks
    start = time.perf_counter()
    with _outside_blocks_on_device(model, blocks, plan.device):
        inputs = capture_block_inputs(model, blocks[0], batches, plan.device) if plan.needs else []
    timings["capture_s"] = time.perf_counter() - start
    per_block = [block_layers(prefix, i, plan.layers) for i in range(len(blocks))]
    last = last_pruned_block(per_block)
    for i in tqdm(range(last + 1), desc="pruning blocks", unit="block"):
        t0, block, layers = time.perf_counter(), blocks[i], per_block[i]
        with on_device(block, plan.device):
            stats = None
            if plan.needs and layers:
                with collect(layers, hessian=HESSIAN in plan.needs) as stats:
                    run_block(block, inputs)
            prune_layers(layers, stats, plan)
            if plan.needs and i < last:  # only a later block with pruned layers needs this block's outputs
                outputs = run_block(block, inputs)
                inputs = [_with_input(a, k, h) for (a, k), h in zip(inputs, outputs)]
        timings[f"block_{i}_s"] = time.perf_counter() - t0
        log.info("block %d/%d: pruned %d layers in %.2fs", i + 1, len(blocks), len(layers), timings[f"block_{i}_s"])


def last_pruned_block(per_block: Sequence[Mapping[str, nn.Module]]) -> int:
    """Index of the last block holding a selected layer (-1 if none): blocks after it are neither pruned nor
    run, and its own pruned outputs feed nothing."""
    return max((i for i, layers in enumerate(per_block) if layers), default=-1)


@contextmanager
def _outside_blocks_on_device(model: nn.Module, blocks: nn.Module, device: torch.device | None):
    """Everything but the block list on the compute device (embeddings, rotary tables), and block 0."""
    if device is None:
        yield
        return
    home = next(model.parameters()).device
    block_ids = {id(m) for m in blocks.modules()}
    outside = [m for m in model.modules() if id(m) not in block_ids]
    for m in outside:
        _move_own(m, device)
    try:
        with on_device(blocks[0], device):
            yield
    finally:
        for m in outside:
            _move_own(m, home)


def _move_own(module: nn.Module, device: torch.device) -> None:
    """Move a module's own parameters and buffers, not its children's (``Module.to`` is recursive)."""
    for p in module.parameters(recurse=False):
        p.data = p.data.to(device)
    for key, b in module.named_buffers(recurse=False):
        module._buffers[key] = b.to(device)


@torch.no_grad()
def prune_oneshot(model: nn.Module, batches: Sequence[Batch], plan: Plan, timings: dict[str, float]) -> None:
    start = time.perf_counter()
    with on_device(model, plan.device), _stats_context(plan.layers, plan) as stats:
        if stats is not None:
            for batch in tqdm(batches, desc="calibrating", unit="batch"):
                run_model(model, batch, plan.device)
        timings["capture_s"] = time.perf_counter() - start
        prune_layers(plan.layers, stats, plan)
    timings["prune_s"] = time.perf_counter() - start - timings["capture_s"]


@torch.no_grad()
def dense_statistics(model: nn.Module, batches: Sequence[Batch], plan: Plan) -> dict[str, LayerStats]:
    """Norm statistics of every selected layer on the dense model (for allocation: OWL), block by block."""
    if plan.blocks is None:
        with on_device(model, plan.device), collect(plan.layers) as stats:
            for batch in batches:
                run_model(model, batch, plan.device)
            return dict(stats)
    prefix, blocks = plan.blocks
    with _outside_blocks_on_device(model, blocks, plan.device):
        inputs = capture_block_inputs(model, blocks[0], batches, plan.device)
    result = {}
    for i, block in enumerate(blocks):
        with on_device(block, plan.device), collect(block_layers(prefix, i, plan.layers)) as stats:
            outputs = run_block(block, inputs)
            result.update(stats)
        inputs = [_with_input(a, k, h) for (a, k), h in zip(inputs, outputs)]
    return result


@torch.no_grad()
def blocks_are_chained(model: nn.Module, blocks: nn.Module, batch: Batch, device: torch.device | None) -> bool:
    """Whether block 1 receives block 0's output on a real forward pass. A list of identical modules can
    also be parallel branches; feeding one branch's output to the next would be wrong."""
    seen: dict[str, torch.Tensor] = {}

    def out_hook(module, args, output):
        seen["out"] = _block_output(output)

    def in_hook(module, args, kwargs):
        seen["in"] = args[0] if args else next(iter(kwargs.values()), None)
        raise _StopForward

    handles = [blocks[0].register_forward_hook(out_hook), blocks[1].register_forward_pre_hook(in_hook, with_kwargs=True)]
    try:
        with _outside_blocks_on_device(model, blocks, device), on_device(blocks[1], device):
            run_model(model, batch, device)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    out, inp = seen.get("out"), seen.get("in")
    return isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor) and out.shape == inp.shape \
        and out.data_ptr() == inp.data_ptr()


def run(model: nn.Module, batches: Sequence[Batch], plan: Plan) -> dict[str, float]:
    """Prune ``model`` in place according to ``plan``; returns timings in seconds."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if plan.blocks is not None and plan.needs and not blocks_are_chained(model, plan.blocks[1], batches[0],
                                                                        plan.device):
        log.warning("blocks of %r do not feed each other (parallel branches?): calibrating in one pass",
                    plan.blocks[0])
        plan.blocks = None
    if plan.blocks is not None:
        prune_sequential(model, batches, plan, timings)
    else:
        prune_oneshot(model, batches, plan, timings)
    timings["total_s"] = time.perf_counter() - start
    return timings

