"""Prune a Hugging Face causal LM that does not fit in memory, one decoder block at a time.

The model is built as a skeleton whose parameters sit on the ``meta`` device (no storage). The tensors
outside the block list that come before block 0 (embeddings) are read to capture block 0's inputs;
then each block is read from the memory-mapped safetensors files onto the compute device, pruned with
the engine's own functions (``collect`` / ``prune_layers`` / ``run_block`` and the same ``Plan`` as
``prunekit.prune``), written to its own output shard and released back to ``meta``. Norms, head and
embeddings are copied through unchanged. The output is an ordinary sharded checkpoint, bit-identical
to pruning the loaded model in memory and calling ``save_pretrained``.

Calibration activations (``nsamples x seqlen x hidden``) stay on the compute device when they fit,
else in CPU memory, else in files on disk (``offload_activations``).
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from ..api import PruneReport, layer_sparsity, plan_prune, versions
from ..data.calib import calibration_batches
from ..engine import (Plan, _with_input, capture_block_inputs, last_pruned_block, model_inputs, prune_layers,
                      run_block)
from ..collect import collect
from ..graph import block_layers
from ..methods import HESSIAN
from .atomic import atomic_dir, check_output_dir
from .compact import Checkpoint, CompactWriter, ShardWriter, copy_side_files, parse_size
from .hf import parse_dtype

log = logging.getLogger(__name__)

OFFLOAD_MODES = ("auto", "device", "cpu", "disk")
SAVE_FORMATS = ("dense", "compact")
# Activations may take at most this fraction of the free memory left after the largest block (x2).
_ACTIVATION_SHARE = 0.5


# ---------------------------------------------------------------- memory

def available_memory(device: torch.device) -> int:
    """Free bytes where tensors on ``device`` live (GPU memory for CUDA, else system RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def peak_memory(device: torch.device) -> dict[str, int]:
    """Peak resident memory of this process, and the peak CUDA allocation when computing on CUDA."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}
    if device.type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): nothing to trim
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None


def release_memory() -> None:
    """Give freed memory back to the OS between blocks. Tensors below glibc's mmap threshold (up to 32 MiB)
    come from the heap, whose free holes the OS does not get back on its own: without this the resident
    size of a lazy run grew with every block instead of staying flat."""
    gc.collect()  # safetensors' saves leave small reference cycles that pin heap chunks
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}GiB"


def memory_text(device: torch.device) -> str:
    peak = peak_memory(device)
    text = f"peak RSS {_gib(peak['peak_rss_bytes'])}"
    return text + (f", CUDA {_gib(peak['cuda_peak_bytes'])}" if "cuda_peak_bytes" in peak else "")


def choose_offload(mode: str, activation_bytes: int, device: torch.device, reserve_bytes: int = 0) -> str:
    """Where block inputs live: ``device`` when they fit next to the working block, else ``cpu``, else
    ``disk``. On a CPU compute device ``device`` and ``cpu`` are the same place."""
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload_activations {mode!r}; choose from {', '.join(OFFLOAD_MODES)}")
    if mode != "auto":
        return mode
    if device.type == "cuda" and activation_bytes <= _ACTIVATION_SHARE * (available_memory(device) - reserve_bytes):
        return "device"
    ram = available_memory(torch.device("cpu")) - (reserve_bytes if device.type == "cpu" else 0)
    if activation_bytes <= _ACTIVATION_SHARE * ram:
        return "device" if device.type == "cpu" else "cpu"
    return "disk"


# ---------------------------------------------------------------- calibration activations

def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a block receives: its first positional argument, else its first keyword."""
    return args[0] if args else next(iter(kwargs.values()))


def _moved(args: tuple, kwargs: dict, device: torch.device) -> tuple[tuple, dict]:
    return model_inputs(tuple(args), device)[0], model_inputs(dict(kwargs), device)[1]


class Activations:
    """Block inputs for every calibration batch. The hidden states (the big part) are kept on the compute
    device, in CPU memory or in one file per batch under ``directory`` (``torch.from_file``, shared
    memory map); the other block arguments (masks, rotary tables) stay on the device or in CPU memory."""

    def __init__(self, where: str, device: torch.device, directory: Path | None = None):
        if where == "disk" and directory is None:
            raise ValueError("disk offload needs a directory for the activation files")
        self.where, self.device, self.directory = where, device, directory
        self.home = device if where == "device" else torch.device("cpu")
        self.calls: list[tuple[tuple, dict]] = []
        self.hidden: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.calls)

    def append(self, args: tuple, kwargs: dict) -> None:
        hidden = _hidden_of(args, kwargs)
        self.calls.append(_moved(*_with_input(args, kwargs, None), self.home))
        self.hidden.append(self._stored(len(self.hidden), hidden))

    def call(self, j: int) -> tuple[tuple, dict]:
        """Batch ``j``'s block arguments on the compute device."""
        args, kwargs = _moved(*self.calls[j], self.device)
        return _with_input(args, kwargs, self.hidden[j].to(self.device))

    def update(self, j: int, hidden: torch.Tensor) -> None:
        """Replace batch ``j``'s hidden state by the block's output (the next block's input)."""
        if self.where == "disk":
            self.hidden[j].copy_(hidden)
        else:
            self.hidden[j] = hidden.to(self.home)

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)

    def _stored(self, j: int, hidden: torch.Tensor) -> torch.Tensor:
        if self.where != "disk":
            return hidden.to(self.home)
        path = self.directory / f"hidden-{j:06d}.bin"
        buffer = torch.from_file(str(path), shared=True, size=hidden.numel(), dtype=hidden.dtype)
        return buffer.view(hidden.shape).copy_(hidden)


# ---------------------------------------------------------------- the skeleton and its tensors

def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def build_skeleton(source: str | os.PathLike, dtype: torch.dtype | None = None,
                   trust_remote_code: bool = False) -> nn.Module:
    """The model with parameters on ``meta`` (no memory) and real buffers (rotary tables are computed, not
    stored, so they must exist before block 0 runs)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or _config_dtype(config),
                                                 trust_remote_code=trust_remote_code)
    return model.eval()


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise KeyError(f"checkpoint tensor {name!r} is neither a parameter nor a buffer of the model")


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
    def open(cls, source: str | os.PathLike, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None, trust_remote_code: bool = False) -> "LazyModel":
        dtype = parse_dtype(dtype)
        device = torch.device(device) if device is not None else default_device()
        model = build_skeleton(source, dtype, trust_remote_code)
        _buffers_to(model, device)
        return cls(model, Checkpoint(source), device, dtype)

    def onload(self, names: Iterable[str]) -> None:
        for name, tensor in self._read(names).items():
            _set_tensor(self.model, name, tensor.to(self.device))

    def offload(self, names: Iterable[str]) -> None:
        for name in names:
            _set_tensor(self.model, name, _get_tensor(self.model, name).to("meta"))
        release_memory()

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
        head_names = {f"{n}.{k}" for n, m in self.model.named_modules() if m is head for k, _ in
                      m.named_parameters(recurse=False)} if head is not None else set()
        return [n for n in self.outside_names(prefix) if n not in head_names]

    def _read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        missing = [n for n in names if n not in self.checkpoint.weight_map]
        if missing:
            raise KeyError(f"the checkpoint has no tensors {missing[:3]}... that the model defines; its tensor "
                           "names differ from the module names (transformers renames keys for some "
                           "architectures), which lazy pruning does not support: prune it in memory")
        return self.checkpoint.read(names, self.dtype)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# ---------------------------------------------------------------- the loop

@torch.no_grad()
def capture_inputs(lazy: LazyModel, plan: Plan, batches: Sequence[Any], mode: str,
                   directory: Path | None) -> Activations:
    """Block 0's inputs for every batch, captured one batch at a time straight into their store."""
    prefix, blocks = plan.blocks
    names = lazy.input_names(prefix)
    lazy.onload(names)
    try:
        first = capture_block_inputs(lazy.model, blocks[0], batches[:1], lazy.device)[0]
        total = _hidden_of(*first).numel() * _hidden_of(*first).element_size() * len(batches)
        reserve = 2 * lazy.checkpoint.nbytes(lazy.block_names(prefix, 0))
        acts = Activations(choose_offload(mode, total, lazy.device, reserve), lazy.device, directory)
        acts.append(*first)
        for batch in batches[1:]:
            acts.append(*capture_block_inputs(lazy.model, blocks[0], [batch], lazy.device)[0])
    finally:
        lazy.offload(names)
    log.info("calibration activations: %s in %s", _gib(acts.nbytes()), acts.where)
    return acts


@torch.no_grad()
def prune_block(block: nn.Module, layers: dict[str, nn.Module], acts: Activations | None, plan: Plan,
                feed_next: bool = True) -> None:
    """One step of the engine's sequential loop (statistics on the dense block, prune, re-run to feed
    the next block unless ``feed_next`` is false), streaming one batch at a time from wherever the
    activations are kept."""
    stats = None
    if plan.needs and layers:
        with collect(layers, hessian=HESSIAN in plan.needs) as stats:
            for j in range(len(acts)):
                run_block(block, [acts.call(j)])
    prune_layers(layers, stats, plan)
    if plan.needs and feed_next:
        for j in range(len(acts)):
            acts.update(j, run_block(block, [acts.call(j)])[0])


def _write(lazy: LazyModel, names: Sequence[str], writer, from_model: bool) -> None:
    """Tensors into the writer, then close the shard (the caller frees them right after)."""
    for name in names:
        tensor = lazy.tensor(name) if from_model else lazy.checkpoint.read([name], lazy.dtype)[name]
        writer.add({name: tensor})
    writer.flush()


def prune_blocks(lazy: LazyModel, plan: Plan, acts: Activations | None, writer,
                 timings: dict[str, float]) -> dict[str, dict]:
    """Onload, prune, write and release every block in order; returns per-layer sparsity rows."""
    prefix, blocks = plan.blocks
    rows: dict[str, dict] = {}
    per_block = [block_layers(prefix, i, plan.layers) for i in range(len(blocks))]
    last = last_pruned_block(per_block)
    bar = tqdm(range(len(blocks)), desc="pruning blocks (lazy)", unit="block")
    for i in bar:  # every block is written; those after the last pruned one are only copied
        start, names = time.perf_counter(), lazy.block_names(prefix, i)
        lazy.onload(names)
        layers = per_block[i]
        prune_block(blocks[i], layers, acts, plan, feed_next=i < last)
        rows.update(layer_sparsity(layers)[0])
        _write(lazy, names, writer, from_model=True)
        lazy.offload(names)
        timings[f"block_{i}_s"] = time.perf_counter() - start
        bar.set_postfix_str(memory_text(lazy.device))
        log.info("block %d/%d pruned in %.1fs (%s)", i + 1, len(blocks), timings[f"block_{i}_s"],
                 memory_text(lazy.device))
    return rows


def _check_plan(plan: Plan) -> None:
    if plan.blocks is None:
        raise ValueError("lazy pruning goes block by block, but no block list covers the selected layers "
                         "(or the comparison group is global); prune in memory instead, or select only "
                         "layers inside the decoder blocks")


def _check_options(offload_activations: str, save_format: str) -> None:
    if offload_activations not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload_activations {offload_activations!r}; choose from "
                         f"{', '.join(OFFLOAD_MODES)}")
    if save_format not in SAVE_FORMATS:
        raise ValueError(f"unknown save_format {save_format!r}; choose from {', '.join(SAVE_FORMATS)}")


def _calibration(source, calib, tokenizer, plan: Plan, nsamples, seqlen, seed, batch_size) -> list:
    if not plan.needs:
        return []
    if tokenizer is None and isinstance(calib, (str, os.PathLike)):
        from .hf import load_tokenizer
        tokenizer = load_tokenizer(source)
    return calibration_batches(calib, tokenizer, nsamples, seqlen, seed, batch_size)


def _report(settings: dict, rows: dict, plan: Plan, timings: dict, metrics: dict) -> PruneReport:
    zeros, total = sum(r["zeros"] for r in rows.values()), sum(r["numel"] for r in rows.values())
    for name, row in rows.items():
        row["target"] = plan.targets[name].sparsity
    settings["blocks"] = plan.blocks[0]
    return PruneReport(settings, rows, zeros / max(total, 1), timings, versions(), metrics)


def prune_lazy(source: str | os.PathLike, out: str | os.PathLike, method: str = "wanda", sparsity: float = 0.5,
               pattern: str | None = None, group: str | None = None, calib: Any = None, *,
               update: str | Iterable[str] | None = None, method_params: dict | None = None,
               update_params: dict | None = None, include: Iterable[str] | None = None,
               exclude: Iterable[str] | None = None, layer_types: Iterable[str] = ("linear",),
               device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               tokenizer: Any = None, nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
               batch_size: int = 8, offload_activations: str = "auto", offload_dir: str | None = None,
               save_format: str = "dense", max_shard_size: int | str = "5GB", overwrite: bool = False,
               trust_remote_code: bool = False) -> PruneReport:
    """Prune the safetensors checkpoint in ``source`` block by block into ``out`` without ever holding the
    whole model in memory. Same settings and result as ``prunekit.prune`` on the loaded model followed by
    ``save_pretrained`` (allocation is uniform; N:M and every method/update work). ``device`` defaults to
    CUDA when present; ``dtype`` casts floating tensors as they are read (default: as stored)."""
    settings = {k: v for k, v in locals().items() if k not in ("calib", "tokenizer")}
    _check_options(offload_activations, save_format)
    out = check_output_dir(out, [source], overwrite)
    lazy = LazyModel.open(source, device, dtype, trust_remote_code)
    plan = plan_prune(lazy.model, method, sparsity, pattern, group, update, method_params, update_params,
                      include, exclude, layer_types, True, lazy.device)
    _check_plan(plan)
    batches = _calibration(source, calib, tokenizer, plan, nsamples, seqlen, seed, batch_size)
    with atomic_dir(out) as tmp:
        timings, rows, where = _run(lazy, plan, batches, tmp, offload_activations, offload_dir, save_format,
                                    max_shard_size)
    metrics = {**peak_memory(lazy.device), "offload_activations": where,
               "checkpoint_bytes": lazy.checkpoint.nbytes(lazy.checkpoint.names())}
    return _report({**settings, "source": str(source), "out": str(out)}, rows, plan, timings, metrics)


def _writer(lazy: LazyModel, plan: Plan, tmp: Path, save_format: str,
            max_shard_size: int | str) -> ShardWriter | CompactWriter:
    """Shards of at most one block's size (each block gets its own shard anyway): copying the embeddings
    and head then never holds more than a block's worth of memory either."""
    prefix, blocks = plan.blocks
    block_bytes = max(lazy.checkpoint.nbytes(lazy.block_names(prefix, i)) for i in range(len(blocks)))
    limit = min(parse_size(max_shard_size), block_bytes)
    return CompactWriter(tmp, limit) if save_format == "compact" else ShardWriter(tmp, limit)


def _run(lazy: LazyModel, plan: Plan, batches: list, tmp: Path, mode: str, offload_dir: str | None,
         save_format: str, max_shard_size) -> tuple[dict, dict, str | None]:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if lazy.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(lazy.device)
    writer = _writer(lazy, plan, tmp, save_format, max_shard_size)
    with tempfile.TemporaryDirectory(prefix="prunekit-activations-", dir=offload_dir) as scratch:
        acts = capture_inputs(lazy, plan, batches, mode, Path(scratch)) if batches else None
        timings["capture_s"] = time.perf_counter() - start
        rows = prune_blocks(lazy, plan, acts, writer, timings)
        where = acts.where if acts is not None else None
        del acts  # release the activation files' memory maps before the directory goes
    copy_start = time.perf_counter()
    _write(lazy, lazy.outside_names(plan.blocks[0]), writer, from_model=False)
    writer.close()
    copy_side_files(lazy.checkpoint.root, tmp)
    timings["copy_s"] = time.perf_counter() - copy_start
    timings["total_s"] = time.perf_counter() - start
    return timings, rows, where
