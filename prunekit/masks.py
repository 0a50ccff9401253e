"""Keep masks: taken from weights, applied to weights and gradients, and packed 8 per byte.

One bit packing serves both the compact checkpoint format and the Lightning callback's state:
most significant bit first, as ``numpy.packbits``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .graph import weight_grad

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def count_zeros(weight: torch.Tensor, chunk: int = 1 << 23) -> int:
    """Exact zeros in ``weight`` (``-0.0`` included). ``count_nonzero`` of a half-zero float tensor branches on
    every element (3x slower on CPU than this); ``ne`` on bounded chunks keeps the temporary mask small."""
    flat = weight.detach().reshape(-1)
    return flat.numel() - sum(int(part.ne(0).count_nonzero()) for part in flat.split(chunk))


def packbits(bits: torch.Tensor) -> torch.Tensor:
    """Flat bool tensor -> uint8, 8 bits per byte, first bit most significant (``numpy.packbits``)."""
    flat = bits.reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8))
    return (flat.reshape(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpackbits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of ``packbits``: the first ``count`` bits as a flat bool tensor."""
    bits = (packed.reshape(-1, 1) & _BIT_WEIGHTS.to(packed.device)) != 0
    return bits.reshape(-1)[:count]


def pack_mask(mask: torch.Tensor) -> dict[str, Any]:
    """A bool keep mask with its shape, 8 weights per byte (a checkpoint grows by 1/32 of an fp32 weight)."""
    return {"shape": list(mask.shape), "bits": packbits(mask.detach().cpu())}


def unpack_mask(packed: Mapping[str, Any]) -> torch.Tensor:
    """Inverse of ``pack_mask``: the bool mask on the CPU."""
    shape = list(packed["shape"])
    return unpackbits(packed["bits"], math.prod(shape)).view(shape)


def masks_from_weights(layers: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Keep masks ``weight != 0`` in each layer's own weight layout."""
    return {name: m.weight.detach() != 0 for name, m in layers.items()}


@torch.no_grad()
def apply_masks(layers: Mapping[str, nn.Module], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place (any dtype, any device the mask is on)."""
    for name, mask in masks.items():
        layers[name].weight.mul_(mask)


@torch.no_grad()
def mask_gradients(layers: Mapping[str, nn.Module], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the gradients of pruned weights, so an optimizer step cannot revive them (fused MoE experts too:
    their gradient is a slice of the fused parameter's)."""
    for name, mask in masks.items():
        grad = weight_grad(layers[name])
        if grad is not None:
            grad.mul_(mask)
