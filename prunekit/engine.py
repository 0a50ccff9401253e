"""The calibration engine: one loop for every method, every front end and every way a block arrives.

Sequential (the published Wanda/SparseGPT protocol): capture the inputs of block 0 and the keyword
arguments blocks need (attention mask, rotary embeddings, ...), then for each block: collect statistics
on the dense block, prune it, re-run the calibration inputs through the pruned block and feed those
outputs to the next block. Every block is called with the arguments it receives in the model's own
forward pass: when a probe shows that some blocks get other ones than block 0 (Gemma's sliding-window and
full-attention layers: other masks and rotary tables), those are captured per block. A model with several
block lists (an encoder and a decoder; a vision tower and a language model) is calibrated list by list in
the order its forward pass runs them; selected layers outside every list (a multimodal projector) are
pruned on their inputs just before the list that follows them. Two parts plug into the loop:

* where activations live (``prunekit.activations.Activations``: device, CPU or disk);
* how a block arrives (``BlockSource``): already in memory and onloaded to the compute device
  (``InMemoryBlocks``), or read from the checkpoint, pruned, written and freed (``prunekit.io.lazy``).

Models without a block list (or runs that need every layer at once, like a global threshold) get one
calibration pass over the whole model.
"""

from __future__ import annotations

import fnmatch
import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from . import kernels
from .activations import Activations, choose_offload, gib
from .collect import LayerStats, collect
from .config import PruneConfig
from .distributed import entered, layer_owners, rank, reduce_stats, share_weights, sum_expert_tokens, together
from .errors import PrunekitError
from .forward import (
    Batch,
    StopForward,
    block_output,
    first_sample,
    hidden_state,
    hooks,
    on_device,
    outside_on_device,
    run_model,
    same_value,
    streamed_forward,
    with_hidden,
    without_cache,
)
from .graph import Stack, block_index, block_layers, num_groups, set_weight_matrix, weight_matrix
from .groups import GLOBAL, select_global
from .methods import HESSIAN, NORMS, Method, Solver, Target, Update, mask_from_scores
from .progress import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Everything the engine needs, resolved and validated once by the front end (``prunekit.api``);
    never changed afterwards (a changed plan is a new one: ``dataclasses.replace``)."""

    method: Method
    updates: tuple[Update, ...]
    layers: Mapping[str, nn.Module]
    targets: Mapping[str, Target]
    stacks: tuple[Stack, ...] = ()  # block lists calibrated one block at a time; () = one pass over the model
    device: torch.device | None = None
    needs: frozenset[str] = field(default_factory=frozenset)
    config: PruneConfig = field(default_factory=PruneConfig)  # the settings the plan was resolved from


# ---------------------------------------------------------------- layer level (pure tensor work)


def prune_matrix(
    weight: torch.Tensor,
    stats: LayerStats | None,
    groups: int,
    method: Method,
    updates: Sequence[Update],
    target: Target,
    mask: torch.Tensor | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one ``[rows, cols]`` float32 matrix; conv groups are pruned as the separate matmuls they are.

    ``mask`` is given when the mask was chosen across layers (global group); otherwise it comes from the
    method (solver) or from the method's scores within the target's comparison group.
    Returns the new weight (zeros where pruned) and the keep mask. ``inplace``: the caller gives ``weight``
    up, and the zeros are written into it (no new ``[rows, cols]`` tensor: on a 7B-sized block that is
    ~0.8 GB of page faults fewer).
    """
    chunks = weight.split(weight.shape[0] // groups)
    group_stats = [stats.group(g) if stats is not None else None for g in range(groups)]
    if mask is None and isinstance(method, Solver):
        pieces = [method.prune(w, s, target) for w, s in zip(chunks, group_stats)]
        chunks, masks = [p[0] for p in pieces], [p[1] for p in pieces]
        mask = torch.cat(masks)
    elif mask is None:
        mask = mask_from_scores(score_matrix(weight, stats, groups, method), target)
    masks = list(mask.split(weight.shape[0] // groups))
    for update in updates:
        pieces = [update.update(w, m, s, target) for w, m, s in zip(chunks, masks, group_stats)]
        chunks, masks = [p[0] for p in pieces], [p[1] for p in pieces]
    mask = joined(masks)
    return (joined(chunks).mul_(mask) if inplace else joined(chunks) * mask), mask


def score_matrix(weight: torch.Tensor, stats: LayerStats | None, groups: int, method: Method) -> torch.Tensor:
    chunks = weight.split(weight.shape[0] // groups)
    return joined([method.score(w, stats.group(g) if stats is not None else None) for g, w in enumerate(chunks)])


def joined(pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` without its copy when there is one piece (every layer but grouped convs): on a 7B-sized
    block the copies cost as much as the selection."""
    return pieces[0] if len(pieces) == 1 else torch.cat(list(pieces))


@torch.no_grad()
def prune_layers(layers: Mapping[str, nn.Module], stats: Mapping[str, LayerStats] | None, plan: Plan) -> None:
    """Prune ``layers`` in place (a block's worth, or the whole model). With several ranks each prunes the layers
    it owns (``prunekit.distributed.layer_owners``) and the pruned weights are then broadcast to all."""
    owners = layer_owners(layers, HESSIAN in plan.needs)
    with together(), kernels.enabled(plan.config.kernels):
        global_masks = _global_masks(layers, stats, plan)
        mine = {n: m for n, m in layers.items() if owners[n] == rank()}
        for name, module in steps(mine.items(), "pruning layers", len(mine)):
            _prune_layer(name, module, stats[name] if stats is not None else None, plan, global_masks.get(name))
    share_weights(layers, owners)


def _prune_layer(name: str, module: nn.Module, stats: LayerStats | None, plan: Plan, mask: torch.Tensor | None) -> None:
    if stats is not None:
        stats.check_finite(name)
    weight = weight_matrix(module).detach().float()
    check_finite_weight(name, weight)
    new, _ = prune_matrix(
        weight, stats, num_groups(module), plan.method, plan.updates, plan.targets[name], mask, inplace=True
    )
    set_weight_matrix(module, new)


def reduce_statistics(
    layers: Mapping[str, nn.Module], stats: Mapping[str, LayerStats] | None, plan: Plan
) -> Mapping[str, LayerStats] | None:
    """Every rank's statistics of ``layers`` summed (in place) before any mask is chosen; a Hessian only where its
    layer is pruned. A no-op in one process."""
    if stats is not None:
        reduce_stats(stats, layer_owners(layers, HESSIAN in plan.needs))
        sum_expert_tokens(layers)
    return stats


def check_finite_weight(name: str, weight: torch.Tensor) -> None:
    """NaN ranks above every score and would be kept: a layer with NaN/inf weights cannot be pruned honestly.
    (Minimum and maximum carry any NaN or inf: one pass without a mask, 25x faster than ``isfinite().all()``.)"""
    if weight.numel() and not torch.isfinite(torch.stack(torch.aminmax(weight))).all():
        raise PrunekitError(
            f"layer {name!r} has NaN/inf weights; the checkpoint is damaged or was saved after a "
            "diverged training step: prune a healthy checkpoint (or exclude the layer)"
        )


def _global_masks(layers, stats, plan: Plan) -> dict[str, torch.Tensor]:
    globals_ = [n for n in layers if plan.targets[n].group == GLOBAL and plan.targets[n].nm is None]
    if not globals_:
        return {}
    scores = {
        n: score_matrix(
            weight_matrix(layers[n]).detach().float(), stats[n] if stats else None, num_groups(layers[n]), plan.method
        )
        for n in globals_
    }
    return select_global(scores, plan.targets[globals_[0]].sparsity)


def steps(items, desc: str, total: int | None = None):
    """Progress (with ETA) of the steps inside one block, which take minutes on a 7B-sized block on CPU; a bar
    disappears when done so the block bar stays readable (``prunekit.progress``)."""
    return progress(items, desc, total, unit="step", inner=True)


def plan_collect(layers: Mapping[str, nn.Module], plan: Plan):
    """``collect`` the statistics the plan's method and updates declared, for ``layers``."""
    return collect(layers, hessian=HESSIAN in plan.needs, dtype=getattr(torch, plan.config.stats_dtype))


# ---------------------------------------------------------------- capturing block 0's inputs


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    first_block: nn.Module,
    batches: Sequence[Batch],
    device: torch.device | None,
    store: Callable[[tuple, dict], None],
) -> None:
    """Run the model up to block 0 for every batch and hand what block 0 received (args, kwargs) to ``store``."""
    seen = []

    def catch(module, args, kwargs):
        store(args, without_cache(kwargs))
        seen.append(True)
        raise StopForward

    with hooks([first_block.register_forward_pre_hook(catch, with_kwargs=True)]):
        for batch in batches:
            try:
                run_model(model, batch, device)
            except StopForward:
                pass
    if len(seen) != len(batches):
        raise PrunekitError(
            "the first block was not reached by every calibration batch: the block list found is "
            "not on the model's forward path; name the right one (blocks=..., --blocks) or "
            "calibrate in one pass (sequential=False, --no-sequential)"
        )


def block_call(args: tuple, kwargs: Mapping) -> tuple[tuple, dict]:
    """A block call as stored: the hidden state left out, no KV cache."""
    return with_hidden(args, without_cache(kwargs), None)


@torch.no_grad()
def record_block_calls(
    model: nn.Module, blocks: nn.Module, batch: Batch, device: torch.device | None, run_blocks: bool, last: int = -1
) -> list[tuple[tuple, dict]]:
    """The arguments (hidden state left out) that blocks ``0..last`` of ``blocks`` receive when the model runs
    ``batch`` (the forward pass stops after block ``last``).

    ``run_blocks`` runs the real blocks: exact for any model, also one whose blocks hand each other more than
    the hidden state (T5's position bias). Without it each block just passes its input on, so no block weight
    is needed (the lazy path, whose blocks are not loaded yet); the arguments a decoder's blocks get are made
    before its block loop, from the batch alone.
    """
    last = last % len(blocks)
    calls: list = [None] * (last + 1)

    def recorder(index: int):
        def hook(module, args, kwargs):
            calls[index] = block_call(args, kwargs)

        return hook

    def stop(module, args, output):
        raise StopForward

    handles = [blocks[i].register_forward_pre_hook(recorder(i), with_kwargs=True) for i in range(last + 1)]
    handles.append(blocks[last].register_forward_hook(stop))
    with hooks(handles), nullcontext() if run_blocks else _passthrough(blocks):
        try:
            run_model(model, batch, device)
        except StopForward:
            pass
    if any(c is None for c in calls):
        raise PrunekitError(
            "not every block of the block list is reached by the forward pass; name the block list "
            "(blocks=..., --blocks) or calibrate in one pass (sequential=False, --no-sequential)"
        )
    return calls


@contextmanager
def _passthrough(blocks: nn.Module):
    """Each block's forward replaced by one that hands its hidden state on unchanged (hooks still run)."""
    saved = {i: b.__dict__.get("forward") for i, b in enumerate(blocks)}
    for b in blocks:
        b.forward = lambda *args, **kwargs: hidden_state(args, kwargs)
    try:
        yield
    finally:
        for i, b in enumerate(blocks):
            if saved[i] is None:
                del b.forward
            else:
                b.forward = saved[i]


def own_calls(calls: Sequence[tuple[tuple, dict]]) -> list[int]:
    """The blocks (after block 0) whose arguments differ from block 0's."""
    return [i for i in range(1, len(calls)) if not same_value(calls[i], calls[0])]


@torch.no_grad()
def forward_order(model: nn.Module, stacks: Sequence[Stack], batch: Batch, device: torch.device | None) -> list[Stack]:
    """``stacks`` in the order the model's forward pass reaches them (T5: encoder, then decoder; a VLM: vision
    tower, then language model). A list the pass never reaches is an error: it would be calibrated on nothing."""
    if len(stacks) < 2:
        return list(stacks)
    order: list[int] = []

    def reached(index: int):
        def hook(module, args, kwargs):
            order.append(index)
            if len(order) == len(stacks):
                raise StopForward

        return hook

    handles = [
        blocks[0].register_forward_pre_hook(reached(i), with_kwargs=True) for i, (_, blocks) in enumerate(stacks)
    ]
    with streamed_forward(model, [blocks for _, blocks in stacks], device), hooks(handles):
        try:
            run_model(model, batch, device)
        except StopForward:
            pass
    missing = [stacks[i][0] for i in range(len(stacks)) if i not in order]
    if missing:
        raise PrunekitError(
            f"the block list(s) {missing} are not reached by the model's forward pass on the calibration data; "
            "name the block lists to calibrate (blocks=..., --blocks) or calibrate in one pass (--no-sequential)"
        )
    return [stacks[i] for i in order]


# ---------------------------------------------------------------- how blocks arrive


class BlockSource(Protocol):
    """How the sequential loop gets each block onto the compute device, and what happens after its turn."""

    def capture(self):
        """Context in which the model can run up to block 0 (embeddings ready on the compute device)."""

    def visit(self, last: int) -> range:
        """The block indices to visit, given the last one holding a selected layer."""

    def block(self, index: int):
        """Context holding block ``index`` on the compute device for its turn."""

    def block_bytes(self) -> int:
        """Size of the largest block, reserved next to the activations when choosing where they live."""

    def block_calls(self, model: nn.Module, batch: Batch, last: int) -> list[tuple[tuple, dict]]:
        """The arguments blocks ``0..last`` receive for ``batch`` (``record_block_calls``)."""


class InMemoryBlocks:
    """Blocks already in memory: the rest of the model and block ``i`` are onloaded for their turns."""

    def __init__(self, model: nn.Module, blocks: nn.Module, device: torch.device | None):
        self.model, self.blocks, self.device = model, blocks, device

    def capture(self):
        return _outside_blocks_on_device(self.model, self.blocks, self.device)

    def visit(self, last: int) -> range:
        return range(last + 1)  # blocks after the last pruned one are neither run nor collected

    def block(self, index: int):
        return on_device(self.blocks[index], self.device)

    def block_bytes(self) -> int:
        return max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in self.blocks)

    def block_calls(self, model: nn.Module, batch: Batch, last: int) -> list[tuple[tuple, dict]]:
        with streamed_forward(model, [self.blocks], self.device):
            return record_block_calls(model, self.blocks, batch, self.device, run_blocks=True, last=last)


@contextmanager
def _outside_blocks_on_device(model: nn.Module, blocks: nn.Module, device: torch.device | None):
    """Everything but the block list on the compute device (embeddings, rotary tables), and block 0."""
    with outside_on_device(model, [blocks], device), on_device(blocks[0], device):
        yield


# ---------------------------------------------------------------- the one sequential loop

# What the loop does with a block's (or the loose layers') selected layers and their input statistics (None without
# calibration): prune them, or only record the statistics.
Step = Callable[[Mapping[str, nn.Module], Mapping[str, LayerStats] | None], None]


class Resume(Protocol):
    """What a resumable run keeps after each block (``prunekit.io.resume``): the loop starts at ``first``, after
    ``restore`` has put back what the interrupted run had done, and reports every finished block to ``done``."""

    first: int  # the first block still to visit (0 for a fresh run)

    def restore(self, blocks: nn.Module, acts: Activations | None) -> None:
        """Blocks ``< first`` as the interrupted run left them, and block ``first``'s inputs into ``acts``."""

    def done(self, index: int, blocks: nn.Module, acts: Activations | None, last: int) -> None:
        """Block ``index`` is finished; ``acts`` hold block ``index + 1``'s inputs (up to block ``last``)."""


@torch.no_grad()
def sequential(
    model: nn.Module,
    batches: Sequence[Batch],
    plan: Plan,
    source: BlockSource,
    step: Step,
    timings: dict[str, float],
    offload_dir: str | None = None,
    stack: Stack | None = None,
    resume: Resume | None = None,
) -> str | None:
    """Visit the blocks of ``stack`` (default: the plan's only one) in order: statistics of block ``i``'s
    selected layers on its inputs, ``step(layers, stats)`` (prune them, or only record the statistics), then
    the block's outputs become block ``i+1``'s inputs. With ``resume`` the loop resumes where an interrupted
    run stopped and reports each finished block. Returns where the activations lived (None without
    calibration). With several ranks each keeps the activations of its own calibration batches."""
    prefix, blocks = stack or plan.stacks[0]
    tag = f"{prefix}." if len(plan.stacks) > 1 else ""  # timing keys stay unique over several stacks
    per_block = [block_layers((prefix, blocks), i, plan.layers) for i in range(len(blocks))]
    last = max((i for i, layers in enumerate(per_block) if layers), default=-1)
    first = resume.first if resume is not None else 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prunekit-activations-", dir=offload_dir) as scratch:
        with together():
            acts = _capture(model, blocks, last, batches, plan, source, Path(scratch)) if plan.needs else None
            if first:
                resume.restore(blocks, acts)
        timings[f"{tag}capture_s"] = time.perf_counter() - start
        bar = progress([i for i in source.visit(last) if i >= first], f"pruning {prefix or 'blocks'}", unit="block")
        for i in bar:
            t0 = time.perf_counter()
            with entered(source.block(i)) as block:  # getting it there and away (lazy: reading, writing) agreed
                if i <= last:
                    step(per_block[i], _block_statistics(block, i, per_block[i], acts, plan))
                    if acts is not None and i < last:  # only a later block with selected layers needs these
                        with together():
                            for j in steps(range(len(acts)), f"block {i}: outputs for the next block"):
                                acts.update(j, run_call(block, acts.call(j, i)))
            if resume is not None:
                resume.done(i, blocks, acts, last)
            timings[f"{tag}block_{i}_s"] = time.perf_counter() - t0
            log.info(
                "%sblock %d/%d: %d layers in %.2fs",
                tag,
                i + 1,
                len(blocks),
                len(per_block[i]),
                time.perf_counter() - t0,
            )
        where = acts.where if acts is not None else None
        del acts  # release the activation files' memory maps before their directory goes
    return where


def _capture(model, blocks, last: int, batches, plan: Plan, source: BlockSource, scratch: Path) -> Activations:
    """Block 0's inputs for every batch, straight into a store placed by size (device, CPU or disk), and the
    arguments of every block that is called with other ones than block 0."""
    device = plan.device
    acts: Activations | None = None

    def store(args: tuple, kwargs: dict) -> None:
        nonlocal acts
        if acts is None:
            hidden = hidden_state(args, kwargs)
            total = hidden.numel() * hidden.element_size() * len(batches)
            compute = device or hidden.device
            where = choose_offload(plan.config.offload_activations, total, compute, 2 * source.block_bytes())
            acts = Activations(where, device, scratch)
        acts.append(args, kwargs)

    with source.capture():
        capture_block_inputs(model, blocks[0], batches, device, store)
    if last > 0 and batches:
        _capture_own_calls(model, batches, source, acts, last)
    log.info("calibration activations: %s in %s", gib(acts.nbytes()), acts.where)
    return acts


def _capture_own_calls(
    model: nn.Module, batches: Sequence[Batch], source: BlockSource, acts: Activations, last: int
) -> None:
    """A probe on one calibration sample finds the blocks called with other arguments than block 0 (which blocks
    differ is a property of the model, not of the data); only when there are some are every batch's calls
    recorded for them."""
    own = own_calls(source.block_calls(model, first_sample(batches[0]), last))
    if not own:
        return
    log.info("blocks %s get other arguments than block 0 (per-layer masks / rotary tables): captured per block", own)
    for batch in batches:
        calls = source.block_calls(model, batch, last)
        for i in own:
            acts.add_own_call(i, *calls[i])


def run_call(block: nn.Module, call: tuple[tuple, dict]) -> torch.Tensor:
    """The hidden state ``block`` returns for one captured call ``(args, kwargs)``."""
    args, kwargs = call
    return block_output(block(*args, **kwargs))


def _block_statistics(
    block: nn.Module, index: int, layers: Mapping[str, nn.Module], acts: Activations | None, plan: Plan
) -> Mapping[str, LayerStats] | None:
    """Input statistics of ``layers`` over every calibration batch through the dense ``block`` (number ``index``),
    summed over the ranks."""
    if acts is None or not layers:
        return None
    with together():
        with plan_collect(layers, plan) as stats:
            for j in steps(range(len(acts)), "statistics"):
                run_call(block, acts.call(j, index))
        stats = {name: stats[name] for name in layers}
    return reduce_statistics(layers, stats, plan)


# ---------------------------------------------------------------- one pass over the whole model


@torch.no_grad()
def whole_model_statistics(
    model: nn.Module, batches: Sequence[Batch], layers: Mapping[str, nn.Module], plan: Plan
) -> dict[str, LayerStats]:
    """Input statistics of ``layers`` over a forward pass of the whole model (already on the compute device) for
    every calibration batch, summed over the ranks."""
    with together():
        with plan_collect(layers, plan) as stats:
            for batch in steps(batches, "calibrating", len(batches)):
                run_model(model, batch, plan.device)
        stats = {name: stats[name] for name in layers}
    return reduce_statistics(layers, stats, plan)


@torch.no_grad()
def prune_oneshot(model: nn.Module, batches: Sequence[Batch], plan: Plan, timings: dict[str, float]) -> None:
    start = time.perf_counter()
    with on_device(model, plan.device):
        stats = whole_model_statistics(model, batches, plan.layers, plan) if plan.needs else None
        timings["capture_s"] = time.perf_counter() - start
        prune_layers(plan.layers, stats, plan)
    timings["prune_s"] = time.perf_counter() - start - timings["capture_s"]


def outside_stacks(plan: Plan) -> dict[str, nn.Module]:
    """The selected layers outside every block list (a VLM's projector between its vision tower and its LM)."""
    return {n: m for n, m in plan.layers.items() if all(block_index(n, stack) is None for stack in plan.stacks)}


@torch.no_grad()
def over_stacks(
    model: nn.Module,
    batches: Sequence[Batch],
    plan: Plan,
    step: Step,
    timings: dict[str, float],
    resume: Resume | None = None,
) -> None:
    """The sequential loop over every block list in forward order. Selected layers outside the lists go to
    ``step`` with their statistics taken on the way to the next list's first block (so that list is then
    calibrated on their pruned outputs), or, after the last list, in one pass over the model. ``resume``
    (a resumable run) needs a plan that ``resumable`` accepts."""
    if resume is not None and not resumable(plan):
        raise ValueError("a resumable run needs one block list holding every selected layer")
    calibrated = bool(plan.needs and batches)
    with together():
        stacks = forward_order(model, plan.stacks, batches[0], plan.device) if calibrated else list(plan.stacks)
    loose = outside_stacks(plan)
    for stack in stacks:
        if loose and calibrated:
            loose = _loose_before(model, stack, batches, plan, loose, step)
        source = InMemoryBlocks(model, stack[1], plan.device)
        sequential(model, batches, plan, source, step, timings, stack=stack, resume=resume)
    if not loose:
        return
    if not calibrated:
        step(loose, None)
        return
    with on_device(model, plan.device):
        step(loose, whole_model_statistics(model, batches, loose, plan))


def resumable(plan: Plan) -> bool:
    """Whether a run can keep its progress block by block: one block list, and every selected layer inside it."""
    return len(plan.stacks) == 1 and not outside_stacks(plan)


def _loose_before(model, stack: Stack, batches, plan: Plan, loose: dict, step: Step) -> dict:
    """Hand the loose layers that run before ``stack``'s first block to ``step``; return the others."""
    with together():
        with plan_collect(loose, plan) as stats, InMemoryBlocks(model, stack[1], plan.device).capture():
            capture_block_inputs(model, stack[1][0], batches, plan.device, lambda args, kwargs: None)
        before = {n: m for n, m in loose.items() if stats.seen(n)}
        collected = {n: stats[n] for n in before}
    if before:
        step(before, reduce_statistics(before, collected, plan))
    return {n: m for n, m in loose.items() if n not in before}


@torch.no_grad()
def dense_statistics(
    model: nn.Module, batches: Sequence[Batch], plan: Plan, needs: frozenset[str] = frozenset({NORMS})
) -> dict[str, LayerStats]:
    """Statistics (norms by default, or what ``needs`` names) of every selected layer on the dense model, block by
    block, through the same loop as pruning with a step that only records: for allocation (OWL), and for a
    sensitivity scan, whose trials each prune one part of an otherwise dense model."""
    result: dict[str, LayerStats] = {}
    plan = replace(plan, needs=frozenset(needs))
    if not plan.stacks:
        with on_device(model, plan.device):
            return whole_model_statistics(model, batches, plan.layers, plan)

    def record(layers: Mapping[str, nn.Module], stats: Mapping[str, LayerStats] | None) -> None:
        result.update(stats or {})

    over_stacks(model, batches, plan, record, {})
    return result


@torch.no_grad()
def blocks_are_chained(model: nn.Module, blocks: nn.Module, batch: Batch, device: torch.device | None) -> bool:
    """Whether block 1 receives block 0's output on a real forward pass. A list of identical modules can
    also be parallel branches; feeding one branch's output to the next would be wrong."""
    seen: dict[str, torch.Tensor] = {}

    def out_hook(module, args, output):
        seen["out"] = block_output(output)

    def in_hook(module, args, kwargs):
        seen["in"] = hidden_state(args, kwargs) if args or kwargs else None
        raise StopForward

    with hooks(
        [blocks[0].register_forward_hook(out_hook), blocks[1].register_forward_pre_hook(in_hook, with_kwargs=True)]
    ):
        try:
            with streamed_forward(model, [blocks], device):
                run_model(model, batch, device)
        except StopForward:
            pass
    out, inp = seen.get("out"), seen.get("in")
    return (
        isinstance(out, torch.Tensor)
        and isinstance(inp, torch.Tensor)
        and out.shape == inp.shape
        and out.data_ptr() == inp.data_ptr()
    )


def chained(model: nn.Module, plan: Plan, batches: Sequence[Batch]) -> Plan:
    """The plan itself, or one calibrating in a single pass when a block list turns out to be parallel branches."""
    if not plan.stacks or not plan.needs or not batches:
        return plan
    for prefix, blocks in plan.stacks:
        if len(blocks) > 1 and not blocks_are_chained(model, blocks, batches[0], plan.device):
            log.warning("blocks of %r do not feed each other (parallel branches?): calibrating in one pass", prefix)
            return replace(plan, stacks=())
    return plan


@torch.no_grad()
def called_layers(model: nn.Module, plan: Plan, batch: Batch) -> set[str]:
    """The selected layers the model's forward pass calls on ``batch`` (fused experts, hooked otherwise, count as
    called). The pass stops once every one has been called: blocks after the last pruned one never run."""
    called = {name for name, m in plan.layers.items() if not isinstance(m, nn.Module)}

    def mark(name: str):
        def hook(module, args):
            called.add(name)
            if len(called) == len(plan.layers):
                raise StopForward

        return hook

    handles = [m.register_forward_pre_hook(mark(n)) for n, m in plan.layers.items() if isinstance(m, nn.Module)]
    with hooks(handles), streamed_forward(model, [blocks for _, blocks in plan.stacks], plan.device):
        try:
            run_model(model, batch, plan.device)
        except StopForward:
            pass
    return called


def uncalled(model: nn.Module, plan: Plan, batches: Sequence[Batch]) -> dict[str, str]:
    """The selected layers no calibration input reaches, each with why: the model never calls them, because
    their parent reads the weight itself (``nn.MultiheadAttention``'s ``out_proj``, Mamba's ``dt_proj``) or does not
    use them. A probe on one sample; layers named by an ``include`` pattern are an error, the others stay dense."""
    if not batches:
        return {}
    called = called_layers(model, plan, first_sample(batches[0]))  # one probe, not one per layer
    missed = [n for n in plan.layers if n not in called]
    reasons = {n: unreached_reason(model, n) for n in missed}
    named = [n for n in missed if any(fnmatch.fnmatchcase(n, p) for p in plan.config.include)]
    if named:
        raise PrunekitError(
            f"{reasons[named[0]]}; exclude it (--exclude '{named[0]}'), or prune it without calibration data "
            "(--method magnitude)"
        )
    return reasons


def unreached_reason(model: nn.Module, name: str) -> str:
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return (
        f"layer {name!r} is never called: {type(parent).__name__}.forward reads its weight directly or does not use "
        "it, so no calibration input reaches it"
    )


def run(model: nn.Module, batches: Sequence[Batch], plan: Plan, resume: Resume | None = None) -> dict[str, float]:
    """Prune ``model`` in place according to ``plan`` (resuming and keeping the progress with ``resume``); returns
    timings in seconds."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if plan.stacks:

        def prune(layers: Mapping[str, nn.Module], stats: Mapping[str, LayerStats] | None) -> None:
            prune_layers(layers, stats, plan)

        over_stacks(model, batches, plan, prune, timings, resume)
    else:
        prune_oneshot(model, batches, plan, timings)
    timings["total_s"] = time.perf_counter() - start
    return timings
