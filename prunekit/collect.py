"""Forward-hook collectors that stream statistics of each layer's input, in float32.

Every layer is seen as a matmul over columns: token features for Linear / HF Conv1D, im2col columns
(input channel x kernel position, one matmul per group) for convolutions, and for one expert of a fused
MoE tensor the rows that expert computes on (``prunekit.moe``: its routed tokens, or every token with
``expert_tokens="all"``). Collected per layer:

* ``sq_sum[g, j]`` = sum over all rows of column ``j`` squared, so ``sqrt`` is Wanda's ``||X_j||_2``;
* ``col_sum[g, j]`` = sum over all rows of column ``j`` (with ``ntokens``: the column mean, for DSnoT);
* ``xtx[g]`` = ``X_g^T X_g`` for SparseGPT / ADMM (only when asked: it is cols x cols).

``nsamples`` counts batch items (sequences / images) as the published Wanda/SparseGPT code does, so the
Hessian ``2 XtX / nsamples`` and its damping are comparable with theirs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PrunekitError
from .forward import hooks
from .graph import CONV_TYPES, num_groups
from .moe import ExpertWeight, expert_hooks

# Above this many im2col elements per chunk the conv input is processed a few batch items at a time.
_CHUNK_ELEMENTS = 1 << 26


@dataclass
class LayerStats:
    """Streaming statistics of one layer's input columns, per conv group (``groups == 1`` otherwise)."""

    sq_sum: torch.Tensor  # [groups, cols] float32
    xtx: torch.Tensor | None = None  # [groups, cols, cols] float32
    nsamples: int = 0
    ntokens: int = 0
    col_sum: torch.Tensor | None = None  # [groups, cols] float32

    @property
    def groups(self) -> int:
        return self.sq_sum.shape[0]

    def norms(self) -> torch.Tensor:
        """Per-column L2 norms ``||X_j||_2``, ``[groups, cols]``."""
        return self.sq_sum.sqrt()

    def hessian(self) -> torch.Tensor:
        """``2 XtX / nsamples`` per group, the published SparseGPT normalisation."""
        if self.xtx is None:
            raise RuntimeError("the Hessian was not collected for this layer (method did not declare it)")
        return self.xtx * (2.0 / max(self.nsamples, 1))

    def to(self, dtype: torch.dtype) -> LayerStats:
        """The same statistics in ``dtype`` (itself when already there)."""
        if self.sq_sum.dtype == dtype:
            return self
        cast = {k: getattr(self, k).to(dtype) for k in ("sq_sum", "xtx", "col_sum") if getattr(self, k) is not None}
        return replace(self, **cast)

    def group(self, g: int) -> LayerStats:
        """The statistics of conv group ``g`` alone (the whole thing for ``groups == 1``)."""
        xtx = None if self.xtx is None else self.xtx[g : g + 1]
        col_sum = None if self.col_sum is None else self.col_sum[g : g + 1]
        return replace(self, sq_sum=self.sq_sum[g : g + 1], xtx=xtx, col_sum=col_sum)

    def check_finite(self, name: str) -> None:
        if not torch.isfinite(self.sq_sum).all() or (self.xtx is not None and not torch.isfinite(self.xtx).all()):
            raise PrunekitError(
                f"layer {name!r} received NaN/inf activations during calibration; check the model's dtype "
                "(fp16 overflow: run in bf16/fp32) and the calibration data"
            )


def _conv_padding(module: nn.Module) -> list[int]:
    """F.pad's argument (last dim first) reproducing the conv's own padding, including 'same'."""
    dims = len(module.kernel_size)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [0] * 2 * dims
        pads = []  # 'same': total = dilation * (k - 1), extra on the right, as torch does
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return pads
    return [p for p in reversed(module.padding) for _ in range(2)]


def _padded(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    pads = _conv_padding(module)
    if not any(pads):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pads, mode=mode)


def _kernel_slices(module: nn.Module, x_pad: torch.Tensor) -> Iterator[torch.Tensor]:
    """For each kernel offset (row-major, matching the weight layout): the input values it multiplies,
    ``[B, C, *out_spatial]``. This is im2col one kernel position at a time, with no full unfold."""
    spatial = x_pad.shape[2:]
    k, s, d = module.kernel_size, module.stride, module.dilation
    out = [(spatial[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(len(k))]
    for offset in itertools.product(*(range(ki) for ki in k)):
        idx = tuple(slice(o * d[i], o * d[i] + s[i] * (out[i] - 1) + 1, s[i]) for i, o in enumerate(offset))
        yield x_pad[(slice(None), slice(None)) + idx]


def conv_columns(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """The im2col matrix per group, ``[groups, rows, cols]`` with cols ordered like ``weight_matrix``."""
    groups = num_groups(module)
    cols = torch.stack(list(_kernel_slices(module, _padded(x, module))), dim=2)  # [B, C, K, *out]
    b, c, kk = cols.shape[:3]
    cols = cols.reshape(b, groups, c // groups, kk, -1)  # [B, G, Cg, K, P]
    return cols.permute(1, 0, 4, 2, 3).reshape(groups, -1, (c // groups) * kk)


def conv_sq_sum(
    x: torch.Tensor, module: nn.Module, square: bool = True, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Column sums of squares (or, with ``square=False``, plain column sums) of the im2col matrix,
    ``[groups, cols]``, one kernel offset at a time."""
    groups = num_groups(module)
    x2 = _padded(x.to(dtype), module)
    x2 = x2.square() if square else x2
    per_offset = [sl.sum(dim=[0] + list(range(2, sl.dim()))) for sl in _kernel_slices(module, x2)]
    sq = torch.stack(per_offset, dim=1)  # [C, K]
    return sq.reshape(groups, -1)


class _Collector:
    """Accumulates one layer's statistics from the inputs its forward hook sees."""

    def __init__(self, module: nn.Module, hessian: bool, dtype: torch.dtype = torch.float32):
        self.module, self.want_hessian, self.dtype = module, hessian, dtype
        self.stats: LayerStats | None = None

    def _init(self, groups: int, cols: int, device: torch.device) -> LayerStats:
        zeros = dict(device=device, dtype=self.dtype)
        xtx = torch.zeros(groups, cols, cols, **zeros) if self.want_hessian else None
        return LayerStats(
            sq_sum=torch.zeros(groups, cols, **zeros), xtx=xtx, col_sum=torch.zeros(groups, cols, **zeros)
        )

    def __call__(self, module: nn.Module, args: tuple, output) -> None:
        x = args[0].detach()
        if isinstance(module, CONV_TYPES) and x.dim() == len(module.kernel_size) + 1:
            x = x.unsqueeze(0)  # unbatched conv input: one sample, not one per channel
        nsamples = 1 if x.dim() == 2 else x.shape[0]
        if isinstance(module, CONV_TYPES):
            self._add_conv(x, module)
        else:
            self._add_rows(x.reshape(-1, x.shape[-1]).to(self.dtype).unsqueeze(0))
        self.stats.nsamples += nsamples

    def add_tokens(self, rows: torch.Tensor, nsamples: int) -> None:
        """Input rows ``[n, cols]`` from ``nsamples`` batch items, handed over by a hook elsewhere (MoE experts)."""
        self._add_rows(rows.to(self.dtype).unsqueeze(0))
        self.stats.nsamples += nsamples

    def _add_rows(self, rows: torch.Tensor) -> None:
        """rows: ``[groups, n, cols]`` float32."""
        if self.stats is None:
            self.stats = self._init(rows.shape[0], rows.shape[2], rows.device)
        self.stats.sq_sum += rows.square().sum(dim=1)
        self.stats.col_sum += rows.sum(dim=1)
        if self.stats.xtx is not None:
            self.stats.xtx += rows.transpose(1, 2) @ rows
        self.stats.ntokens += rows.shape[1]

    def _add_conv(self, x: torch.Tensor, module: nn.Module) -> None:
        """x: a batched conv input ``[B, C, *spatial]``."""
        if not self.want_hessian:
            sq = conv_sq_sum(x, module, dtype=self.dtype)
            if self.stats is None:
                self.stats = self._init(sq.shape[0], sq.shape[1], sq.device)
            self.stats.sq_sum += sq
            self.stats.col_sum += conv_sq_sum(x, module, square=False, dtype=self.dtype)
            self.stats.ntokens += _out_positions(module, x) * x.shape[0]
            return
        per_item = math.prod(x.shape[1:]) * math.prod(module.kernel_size)
        step = max(1, _CHUNK_ELEMENTS // max(per_item, 1))
        for chunk in x.split(step):
            self._add_rows(conv_columns(chunk.to(self.dtype), module))


def _out_positions(module: nn.Module, x: torch.Tensor) -> int:
    return next(_kernel_slices(module, _padded(x[:1, :1], module)))[0, 0].numel()


@contextmanager
def collect(
    layers: dict[str, nn.Module], hessian: bool = False, dtype: torch.dtype = torch.float32
) -> Iterator[Mapping[str, LayerStats]]:
    """Hook ``layers`` for the duration of the block; yields ``{name: LayerStats}`` filled as data flows.

    The hooks are removed on exit, also when the forward pass raises.
    """
    collectors = {name: _Collector(m, hessian, dtype) for name, m in layers.items()}
    experts = {name: m for name, m in layers.items() if isinstance(m, ExpertWeight)}
    handles = [m.register_forward_hook(collectors[name]) for name, m in layers.items() if name not in experts]
    handles += expert_hooks(experts, lambda name, rows, nsamples: collectors[name].add_tokens(rows, nsamples))
    with hooks(handles):
        yield _StatsView(collectors)


class _StatsView(Mapping):
    """Read-only ``{name: LayerStats}`` read from the collectors when asked (after the forward passes)."""

    def __init__(self, collectors: dict[str, _Collector]):
        self._collectors = collectors

    def __getitem__(self, name: str) -> LayerStats:
        stats = self._collectors[name].stats
        if stats is None:
            raise PrunekitError(
                f"layer {name!r} received no input during calibration: the model never called it (its parent may "
                "read the weight directly, as nn.MultiheadAttention does with out_proj and Mamba with dt_proj, or not "
                f"use it on this data); exclude it (--exclude '{name}'), or prune it without calibration data "
                "(--method magnitude)"
            )
        return stats.to(torch.float32)  # accumulated in float64 when asked; methods see float32

    def seen(self, name: str) -> bool:
        """Whether layer ``name`` has received input yet."""
        return self._collectors[name].stats is not None

    def __iter__(self):
        return iter(self._collectors)

    def __len__(self) -> int:
        return len(self._collectors)


def column_norms_for_rows(stats: LayerStats, out_features: int) -> torch.Tensor:
    """``||X_j||`` broadcast to the rows of ``weight_matrix``: ``[1, cols]`` or ``[out, cols]`` for groups."""
    norms = stats.norms()
    if norms.shape[0] == 1:
        return norms
    return norms.repeat_interleave(out_features // norms.shape[0], dim=0)
