"""Where calibration activations live between blocks: on the compute device, in CPU memory, or on disk.

The sequential loop keeps, for every calibration batch, the arguments of the current block's call. The
hidden states (``nsamples x seqlen x hidden`` in all: 1 GiB of fp32 per block boundary for 128 x 2048
tokens of a 7B model) are the big part; the other arguments (masks, rotary tables) are small.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import resource
import sys
from pathlib import Path

import psutil
import torch

from .config import OFFLOAD_MODES
from .errors import PrunekitError
from .forward import hidden_state, to_device, with_hidden

log = logging.getLogger(__name__)

# Activations may take at most this fraction of the free memory left after the working block (x2).
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


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}GiB"


def memory_text(device: torch.device) -> str:
    peak = peak_memory(device)
    text = f"peak RSS {gib(peak['peak_rss_bytes'])}"
    return text + (f", CUDA {gib(peak['cuda_peak_bytes'])}" if "cuda_peak_bytes" in peak else "")


def choose_offload(mode: str, activation_bytes: int, device: torch.device, reserve_bytes: int = 0) -> str:
    """Where block inputs live: ``device`` when they fit next to the working block, else ``cpu``, else
    ``disk``. On a CPU compute device ``device`` and ``cpu`` are the same place."""
    if mode not in OFFLOAD_MODES:
        raise PrunekitError(f"unknown offload_activations {mode!r}; choose from {', '.join(OFFLOAD_MODES)}")
    if mode != "auto":
        return mode
    if device.type == "cuda" and activation_bytes <= _ACTIVATION_SHARE * (available_memory(device) - reserve_bytes):
        return "device"
    ram = available_memory(torch.device("cpu")) - (reserve_bytes if device.type == "cpu" else 0)
    if activation_bytes <= _ACTIVATION_SHARE * ram:
        return "device" if device.type == "cpu" else "cpu"
    return "disk"


# ---------------------------------------------------------------- the store


class Activations:
    """Block inputs for every calibration batch. The hidden states are kept on the compute device, in CPU
    memory or in one file per batch under ``directory``; the other block arguments stay on the device or in
    CPU memory. ``device=None`` leaves tensors where they are.

    On disk, a batch's file is memory-mapped only while that batch is read or written (``self.hidden`` holds
    ``meta`` tensors: shapes, no data). Mappings kept open would count every page ever touched in the
    process's resident size: with 128 x 2048 tokens of a 7B model that is the whole 4 GiB the disk was
    meant to hold."""

    def __init__(self, where: str, device: torch.device | None, directory: Path | None = None):
        if where == "disk" and directory is None:
            raise ValueError("disk offload needs a directory for the activation files")
        self.where, self.device, self.directory = where, device, directory
        self.home = device if where == "device" else torch.device("cpu")
        self.calls: list[tuple[tuple, dict]] = []  # block 0's arguments per batch, hidden state left out
        self.own_calls: dict[int, list[tuple[tuple, dict]]] = {}  # blocks called with other arguments than block 0
        self.hidden: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.calls)

    def append(self, args: tuple, kwargs: dict) -> None:
        hidden = hidden_state(args, kwargs)
        args, kwargs = with_hidden(args, kwargs, None)
        self.calls.append((to_device(tuple(args), self.home), to_device(dict(kwargs), self.home)))
        self.hidden.append(hidden.to("meta") if self.where == "disk" else to_device(hidden, self.home))
        if self.where == "disk":
            self.update(len(self.hidden) - 1, hidden)

    def add_own_call(self, block: int, args: tuple, kwargs: dict) -> None:
        """Block ``block``'s own arguments for the next batch (its hidden state left out), for a block that is not
        called with block 0's (per-layer attention masks and rotary tables)."""
        self.own_calls.setdefault(block, []).append(
            (to_device(tuple(args), self.home), to_device(dict(kwargs), self.home))
        )

    def call(self, j: int, block: int = 0) -> tuple[tuple, dict]:
        """Batch ``j``'s arguments of block ``block`` on the compute device."""
        args, kwargs = self.own_calls.get(block, self.calls)[j]
        args, kwargs = to_device(args, self.device), to_device(kwargs, self.device)
        return with_hidden(args, kwargs, to_device(self.hidden_state(j), self.device))

    def hidden_state(self, j: int) -> torch.Tensor:
        """Batch ``j``'s hidden state where it lives (on disk: mapped until the tensor is dropped)."""
        return self._mapped(j, shared=False) if self.where == "disk" else self.hidden[j]

    def update(self, j: int, hidden: torch.Tensor) -> None:
        """Replace batch ``j``'s hidden state by the block's output (the next block's input)."""
        if self.where == "disk":
            self._mapped(j, shared=True).copy_(hidden)
        else:
            self.hidden[j] = to_device(hidden, self.home)

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)

    def _mapped(self, j: int, shared: bool) -> torch.Tensor:
        """Batch ``j``'s file as a tensor, mapped until the tensor is dropped (``shared``: writes reach the file)."""
        spec, path = self.hidden[j], self.directory / f"hidden-{j:06d}.bin"
        return torch.from_file(str(path), shared=shared, size=spec.numel(), dtype=spec.dtype).view(spec.shape)
