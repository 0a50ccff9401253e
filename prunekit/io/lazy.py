"""Prune a Hugging Face causal LM that does not fit in memory, one decoder block at a time.

The model is built as a skeleton whose parameters sit on the ``meta`` device (no storage). The tensors
outside the block list that come before block 0 (embeddings) are read to capture block 0's inputs;
then each block is read from the memory-mapped safetensors files onto the compute device, pruned by the
engine's one sequential loop (this module only supplies ``StreamedBlocks``: how a block arrives and
leaves), written to its own output shard in the dtype it is stored in (unless ``dtype`` casts it) and
released back to ``meta``.
Reading block ``i+1`` and writing block ``i-1`` run in two threads while block ``i`` is pruned (at most
three blocks resident). Norms, head and embeddings are copied through unchanged. The output is an
ordinary sharded checkpoint, bit-identical to pruning the loaded model in memory and calling
``save_pretrained``, with or without the threads.

Calibration activations (``nsamples x seqlen x hidden``) stay on the compute device when they fit,
else in CPU memory, else in files on disk (``offload_activations``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed as dist
from ..activations import memory_text, peak_memory, release_memory
from ..api import PruneReport, layer_sparsity, model_batches, plan_prune, unstructured_report, window_length, with_ranks
from ..config import PruneConfig, check_save_format, lazy_problems
from ..coverage import Coverage
from ..engine import Plan, outside_stacks, prune_layers, record_block_calls, resumable, sequential
from ..errors import PrunekitError
from ..methods import HESSIAN
from ..moe import expert_report
from ..shapes import sized_by_weights
from ..structured.layer_sizes import take_stored_sizes
from .atomic import OutputClaim, claim_on_writer, write_json
from .compact import Checkpoint, CompactWriter, ShardWriter, copy_side_files, parse_size, write_notice
from .files import safetensors_shapes
from .hf import parse_dtype, shared_parameter_names
from .overlap import Stage, wait
from .paths import checkpoint_bytes
from .resume import LazyResume, ResumeState, fingerprint

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the skeleton and its tensors


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def build_skeleton(
    source: str | os.PathLike, dtype: torch.dtype | None = None, trust_remote_code: bool = False
) -> nn.Module:
    """The model with parameters on ``meta`` (no memory) and real buffers (rotary tables are computed, not
    stored, so they must exist before block 0 runs)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype or _config_dtype(config), trust_remote_code=trust_remote_code
        )
    if sized_by_weights(config):  # layers take the stored tensors' sizes (prunekit.shapes)
        take_stored_sizes(model, {name: shape for name, (_, shape) in safetensors_shapes(source).items()})
    return model.eval()


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise PrunekitError(f"checkpoint tensor {name!r} is neither a parameter nor a buffer of the model")


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    """The skeleton's computed buffers (rotary tables) onto the compute device, where the block inputs are."""
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type != "meta":
                module._buffers[key] = buffer.to(device)


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attr)


@dataclass
class LazyModel:
    """A skeleton whose tensors stay in the checkpoint until a block asks for them."""

    model: nn.Module
    checkpoint: Checkpoint
    device: torch.device
    dtype: torch.dtype | None = None

    @classmethod
    def open(
        cls,
        source: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        trust_remote_code: bool = False,
    ) -> LazyModel:
        dtype = parse_dtype(dtype)
        device = dist.rank_device(torch.device(device) if device is not None else default_device())
        model = build_skeleton(source, dtype, trust_remote_code)
        _buffers_to(model, device)
        lazy = cls(model, Checkpoint(source), device, dtype)
        # A tied head is stored once, under the embedding's name (a meta skeleton is not tied: transformers says which).
        tied = shared_parameter_names(model) | set(getattr(model, "all_tied_weights_keys", None) or {})
        lazy._check_names([n for n in model.state_dict() if n not in tied])  # before anything is read or written
        return lazy

    def onload(self, names: Iterable[str]) -> None:
        """Memory-mapped views onto the compute device: only the pages used are read (an embedding lookup)."""
        self.install(self._read(names))

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """A copy of these tensors in CPU memory, read now (a block, read ahead by a thread); ``install`` moves
        them to the compute device, so every GPU operation stays on the main thread."""
        self._check_names(names)
        return self.checkpoint.load(names, self.dtype)

    def install(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            _set_tensor(self.model, name, tensor.to(self.device))

    def offload(self, names: Iterable[str]) -> None:
        """Back to ``meta``; the memory goes once nothing else holds the tensors (a block's writer)."""
        for name in names:
            _set_tensor(self.model, name, _get_tensor(self.model, name).to("meta"))

    def tensor(self, name: str) -> torch.Tensor:
        return _get_tensor(self.model, name).detach()

    def block_names(self, prefix: str, index: int) -> list[str]:
        """Checkpoint names of block ``index``'s tensors (parameters and persistent buffers)."""
        block = self.model.get_submodule(f"{prefix}.{index}")
        return [f"{prefix}.{index}.{key}" for key in block.state_dict()]

    def outside_names(self, prefix: str) -> list[str]:
        """Checkpoint tensors outside the block list (embeddings, final norm, head), in checkpoint order."""
        return [n for n in self.checkpoint.names() if not n.startswith(f"{prefix}.")]

    def input_names(self, prefix: str) -> list[str]:
        """Outside tensors needed to compute block 0's inputs: all but the output head."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        head_names = (
            {
                f"{n}.{k}"
                for n, m in self.model.named_modules()
                if m is head
                for k, _ in m.named_parameters(recurse=False)
            }
            if head is not None
            else set()
        )
        return [n for n in self.outside_names(prefix) if n not in head_names]

    def _read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        self._check_names(names)
        return self.checkpoint.read(names, self.dtype)

    def _check_names(self, names: Iterable[str]) -> None:
        missing = [n for n in names if n not in self.checkpoint.weight_map]
        if missing:
            raise PrunekitError(
                f"the checkpoint has no tensors {missing[:3]}... that the model defines; its tensor "
                "names differ from the module names (transformers renames keys for some "
                "architectures), which lazy pruning does not support: prune it in memory"
            )


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# ---------------------------------------------------------------- how a block arrives: streamed


class StreamedBlocks:
    """The engine's block source for a checkpoint on disk: each block is read onto the compute device for its
    turn, then written to the output shards and freed. Every block is visited (those after the last pruned
    one are only copied). ``first``: a resumed run starts there (the blocks before it and the tensors outside
    the blocks are written already). Without a ``writer`` (the ranks of a distributed run but rank 0) nothing
    is written.

    With ``overlap`` (the default) block ``i+1`` is read by one thread and block ``i-1`` written by another
    while block ``i`` is pruned: at most three blocks are resident, and a read or write error is raised
    here, unchanged, when its block's turn comes. Used as a context manager, which waits for both threads
    on the way out, so nothing writes into the output once the run has stopped."""

    def __init__(
        self,
        lazy: LazyModel,
        prefix: str,
        blocks: nn.Module,
        writer,
        overlap: bool = True,
        on_block: Callable[[int, nn.Module], None] | None = None,
        first: int = 0,
    ):
        self.lazy, self.prefix, self.blocks, self.writer = lazy, prefix, blocks, writer
        self.on_block = on_block  # sees each block after its turn, while it is loaded (the report's coverage)
        self.first = first
        self.timings: dict[str, float] = {}
        self.reads = Stage("prunekit-read", overlap, self.timings, "read_s")
        self.writes = Stage("prunekit-write", overlap, self.timings, "write_s")
        self.loading: dict[int, Future] = {}
        self.writing: Future | None = None

    def __enter__(self) -> StreamedBlocks:
        """Block 0 is read while its inputs are captured; the tensors outside the blocks (embeddings, norm, head:
        never pruned) are copied meanwhile, so that the end of the run waits for the last block only."""
        if self.reads.threaded and self.first < len(self.blocks):
            self._read_ahead(self.first)
        if self.writer is not None and self.first == 0:
            names = self.lazy.outside_names(self.prefix)
            self.writing = self.writes.submit(copy_tensors, self.lazy, names, self.writer, key="copy_outside_s")
        return self

    def __exit__(self, *exc) -> None:
        self.reads.close()
        self.writes.close()

    @contextmanager
    def capture(self):
        names = self.lazy.input_names(self.prefix)
        self.lazy.onload(names)
        try:
            yield
        finally:
            self.lazy.offload(names)

    def visit(self, last: int) -> range:
        return range(len(self.blocks))

    @contextmanager
    def block(self, index: int):
        if self.writing is not None and self.writing.done():
            self.writing.result()  # a failed write stops the run now, not one block later
        names = self.lazy.block_names(self.prefix, index)
        loaded = self._read_ahead(index)
        if self.reads.threaded and index + 1 < len(self.blocks):
            self._read_ahead(index + 1)
        self.lazy.install(wait(loaded, self.timings, "read_wait_s"))
        del self.loading[index], loaded
        try:
            yield self.blocks[index]
            if self.on_block is not None:
                self.on_block(index, self.blocks[index])
            if self.writer is not None:
                pruned = {name: self.lazy.tensor(name).to("cpu") for name in names}  # GPU -> CPU here, not a thread
                self._write_behind(self._write_block, index, pruned)
        finally:
            self.lazy.offload(names)

    def finish(self) -> None:
        """Wait for the last write."""
        wait(self.writing, self.timings, "finish_wait_s")

    def block_bytes(self) -> int:
        return block_bytes(self.lazy, self.prefix)

    def _read_ahead(self, index: int) -> Future:
        if index not in self.loading:
            self.loading[index] = self.reads.submit(self.lazy.load, self.lazy.block_names(self.prefix, index))
        return self.loading[index]

    def _write_behind(self, fn, *args) -> None:
        """Queue a write once the previous one is done: one block being written, never a backlog."""
        wait(self.writing, self.timings, "write_wait_s")
        self.writing = self.writes.submit(fn, *args)

    def after_write(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the write thread once the writes queued so far are done (a resumable run's
        progress, committed after the block's shards are on disk); its error surfaces like a write's."""
        self.writing = self.writes.submit(_then, self.writing, fn, *args)

    def _write_block(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write the block handed over (its only holder by now), then free it and give the memory back."""
        for name, tensor in tensors.items():
            self.writer.add({name: tensor})
        self.writer.flush()
        tensors.clear()
        release_memory()
        log.info("block %d/%d written (%s)", index + 1, len(self.blocks), memory_text(self.lazy.device))

    def block_calls(self, model: nn.Module, batch, last: int) -> list[tuple[tuple, dict]]:
        """The blocks are not loaded: each hands its input on while its arguments are recorded (a decoder makes
        them from the batch before its block loop)."""
        with self.capture():
            return record_block_calls(model, self.blocks, batch, self.lazy.device, run_blocks=False, last=last)


def _then(previous: Future | None, fn, *args) -> None:
    if previous is not None:
        previous.result()  # a failed write: no progress recorded after it
    fn(*args)


def copy_tensors(lazy: LazyModel, names: Sequence[str], writer) -> None:
    """Checkpoint tensors into the writer unchanged, one memory-mapped tensor at a time, then close the shard."""
    for name in names:
        writer.add({name: lazy.checkpoint.read([name], lazy.dtype)[name]})
    writer.flush()


# ---------------------------------------------------------------- the job


@dataclass(frozen=True)
class Output:
    """How the pruned checkpoint is written: ``dense`` or ``compact`` shards of at most ``max_shard_size``;
    ``overlap``: read the next block and write the previous one in threads while a block is pruned (``None``:
    see ``overlaps``)."""

    save_format: str = "dense"
    max_shard_size: int | str = "5GB"
    overlap: bool | None = None


def overlaps(output: Output, plan: Plan) -> bool:
    """Whether blocks are read and written in threads. By default yes, except for methods that keep a
    ``[cols, cols]`` Hessian per layer (SparseGPT, ADMM): their solve takes ten times the IO the threads hide
    (4% of a 7B run), while the two extra resident blocks beside the Hessians took the peak above a quarter of
    the checkpoint (benchmarks/hardware_limit.py)."""
    return output.overlap if output.overlap is not None else HESSIAN not in plan.needs


def prune_lazy(
    source: str | os.PathLike,
    out: str | os.PathLike,
    config: PruneConfig | str | None = None,
    sparsity: float | None = None,
    pattern: str | None = None,
    group: str | None = None,
    calib: Any = None,
    *,
    tokenizer: Any = None,
    offload_dir: str | None = None,
    save_format: str = "dense",
    max_shard_size: int | str = "5GB",
    overlap: bool | None = None,
    overwrite: bool = False,
    resume: bool | None = None,
    trust_remote_code: bool = False,
    inputs: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Callable[[Path], None]] | None = None,
    **settings: Any,
) -> PruneReport:
    """Prune the safetensors checkpoint in ``source`` block by block into ``out`` without ever holding the
    whole model in memory. Same settings (a ``PruneConfig`` or its keywords) and result as ``prunekit.prune``
    on the loaded model followed by ``save_pretrained`` (allocation is uniform; N:M and every method/update
    work). The device defaults to CUDA when present; ``dtype`` casts floating tensors as they are read
    (default: as stored, which is also what is written). ``overlap=False`` reads and writes each block on
    the calling thread (one block resident instead of three; same output, slower); the default overlaps except
    for Hessian methods (``overlaps``). ``out`` is claimed before
    anything is read (``inputs``: the other paths the job reads, by flag); ``prune_report.json`` and
    ``extra_files`` (name -> writer) are written inside the output before it appears.

    ``resume`` (the CLI's ``--resume``, see ``prunekit.io.resume``): None keeps the progress after each block
    beside ``out`` and continues an interrupted run with the same settings and inputs; True requires one;
    False keeps none. Inside a ``torch.distributed`` process group every rank calls this with the same arguments:
    each reads every block and calibrates on its share of the batches, rank 0 alone claims and writes ``out``."""
    config = PruneConfig.of(config, sparsity=sparsity, pattern=pattern, group=group, **settings)
    output = Output(save_format, max_shard_size, overlap)
    _check_lazy_config(config, save_format)
    dist.check_launch()
    inputs = {"--model": source, **(inputs or {})}
    job = {"save_format": save_format, "max_shard_size": max_shard_size, "lazy": True}
    check = fingerprint({**config.settings(), **job}, {**inputs, "calib": calib})
    with claim_on_writer(out, inputs, overwrite, checkpoint_bytes(source)) as claim:
        state = ResumeState.open(out, resume, check)
        try:
            report = _prune_claimed(
                source, claim, config, calib, tokenizer, offload_dir, output, trust_remote_code, extra_files, out, state
            )
        except BaseException as err:
            state.failed(err)
            raise
        state.finish()
        return report


def _prune_claimed(
    source,
    claim: OutputClaim | None,
    config: PruneConfig,
    calib,
    tokenizer,
    offload_dir,
    output: Output,
    trust_remote_code: bool,
    extra_files,
    out,
    state: ResumeState,
) -> PruneReport:
    with dist.together():
        lazy = LazyModel.open(source, config.device, config.dtype, trust_remote_code)
        plan = replace(plan_prune(lazy.model, config), device=lazy.device)
        if len(plan.stacks) != 1 or outside_stacks(plan):
            raise PrunekitError(
                "lazy pruning goes block by block through one block list, but the selected layers are not all "
                "inside one; prune in memory instead, or select only layers inside the decoder blocks"
            )
        if tokenizer is None and isinstance(calib, (str, os.PathLike)) and plan.needs:
            from .hf import load_tokenizer

            tokenizer = load_tokenizer(source, trust_remote_code)
        batches = model_batches(lazy.model, calib, tokenizer, config) if plan.needs else []
    if state.saved:
        plan = replace(plan, targets=LazyResume(state, None, None).targets)  # as the interrupted run had them
    with dist.entered(claim.staging() if claim is not None else nullcontext()) as tmp:
        coverage = Coverage(lazy.model, plan.layers)
        timings, rows, where = _run(lazy, plan, batches, tmp, offload_dir, output, coverage, state)
        peaks = dist.gather_ints([peak_memory(lazy.device)["peak_rss_bytes"]])
        metrics = {
            **peak_memory(lazy.device),
            "io_overlap": overlaps(output, plan),
            "offload_activations": where,
            "checkpoint_bytes": lazy.checkpoint.nbytes(lazy.checkpoint.names()),
        }
        if len(peaks) > 1:
            metrics["peak_rss_bytes_per_rank"] = [p[0] for p in peaks]
        report = unstructured_report(
            config,
            plan,
            rows,
            timings,
            seqlen=window_length(batches),
            job={"source": str(source), "out": str(claim.out if claim is not None else out), "lazy": True},
            metrics=metrics,
            coverage=coverage.result([plan.stacks[0][0]]),
            experts=expert_report(lazy.model, plan.layers, config.expert_tokens, config.expert_min_tokens),
        )
        report = with_ranks(report)
        with dist.together():
            if claim is not None:
                write_json(tmp / "prune_report.json", report.to_dict())
                for name, writer in (extra_files or {}).items():
                    writer(tmp / name)
    return report


def _check_lazy_config(config: PruneConfig, save_format: str) -> None:
    check_save_format(save_format)
    problems = lazy_problems(config)
    if problems:
        raise PrunekitError(f"lazy pruning needs {'; '.join(problems)}; prune in memory otherwise")


def _writer(lazy: LazyModel, prefix: str, tmp: Path, save_format: str, max_shard_size: int | str):
    """Shards of at most one block's size (each block gets its own shard anyway): copying the embeddings
    and head then never holds more than a block's worth of memory either."""
    limit = min(parse_size(max_shard_size), block_bytes(lazy, prefix))
    return CompactWriter(tmp, limit) if save_format == "compact" else ShardWriter(tmp, limit)


def block_bytes(lazy: LazyModel, prefix: str) -> int:
    """Size of the largest block as stored (from the file headers)."""
    count = len(lazy.model.get_submodule(prefix))
    return max(lazy.checkpoint.nbytes(lazy.block_names(prefix, i)) for i in range(count))


def _run(
    lazy: LazyModel,
    plan: Plan,
    batches: list,
    tmp: Path | None,
    offload_dir: str | None,
    output: Output,
    coverage: Coverage,
    state: ResumeState,
) -> tuple[dict, dict, str | None]:
    """The sequential loop over the streamed blocks. A resumable run writes the output shards into its state
    folder (moved into ``tmp`` at the end) and continues an interrupted one; ``tmp`` is None on the ranks that do
    not write."""
    timings: dict[str, float] = {}
    rows: dict[str, dict] = {}
    start = time.perf_counter()
    if lazy.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(lazy.device)
    prefix, blocks = plan.stacks[0]
    keep = state.keep and resumable(plan)
    writer = None
    with dist.together():
        if tmp is not None:
            if keep:
                state.path.mkdir(exist_ok=True)
            writer = _writer(lazy, prefix, state.path if keep else tmp, output.save_format, output.max_shard_size)
            if state.saved:
                writer.restore(state.saved["writer"])

    def step(layers: dict, stats) -> None:
        prune_layers(layers, stats, plan)
        rows.update(layer_sparsity(layers)[0])

    def counted(index: int, block: nn.Module) -> None:
        coverage.add(f"{prefix}.{index}", block)

    def report_so_far() -> dict:
        return {"rows": rows, "coverage": coverage_state(coverage)}

    with StreamedBlocks(lazy, prefix, blocks, writer, overlaps(output, plan), counted, state.first) as source:
        resume = None
        if keep:
            resume = LazyResume(state, source.after_write, writer, report_so_far).bind(plan, True)
            if state.saved:
                rows.update(state.saved["report"]["rows"])
                restore_coverage(coverage, state.saved["report"]["coverage"])
        where = sequential(lazy.model, batches, plan, source, step, timings, offload_dir, resume=resume)
        copy_start = time.perf_counter()
        with dist.together():
            source.finish()
    with dist.together():
        if writer is not None:
            if keep:
                state.drop_progress()  # the shards leave the state folder: nothing to resume from now
            writer.close(dest=tmp)
            copy_side_files(lazy.checkpoint.root, tmp)
            if output.save_format == "compact":
                write_notice(tmp)
    timings["copy_s"] = time.perf_counter() - copy_start
    timings.update(source.timings)
    timings["total_s"] = time.perf_counter() - start
    return timings, rows, where


def coverage_state(coverage: Coverage) -> dict:
    """What the report's coverage has counted so far, as plain data (a resumed run starts from it)."""
    keys = ("zeros", "total", "selected_zeros", "selected_total", "left")
    return json.loads(json.dumps({k: getattr(coverage, k) for k in keys}))


def restore_coverage(coverage: Coverage, saved: Mapping[str, Any]) -> None:
    for key, value in saved.items():
        setattr(coverage, key, value)
