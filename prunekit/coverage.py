"""Honest coverage: what share of the weights inside the model's blocks a run actually pruned.

``report.sparsity`` is measured over the selected layers. A model can hold large weight tensors inside its
blocks that are not selected layers: excluded by a pattern, of a layer type not asked for, or not a matmul the
walker knows (before prunekit learned fused MoE experts, a Mixtral "pruned to 50%" had 5% zeros in its
blocks). ``block_coverage`` measures the sparsity over every weight matrix inside the blocks and lists each one
left unpruned with the reason, so a report can never claim more than was done.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from .graph import find_layers, find_stacks
from .masks import count_zeros
from .moe import gate_modules

log = logging.getLogger(__name__)

# Block and selected-layer sparsity may differ by this much before a run warns (dense norms, biases and small
# tensors sit in the blocks too; a few points is normal, more means weights were left out).
WARN_GAP = 0.03


def _storage(tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _reason(
    module_name: str, param: str, model: nn.Module, prunable: Mapping[str, nn.Module], gates: set, reasons: Mapping
) -> str:
    if module_name in reasons:
        return reasons[module_name]
    if module_name in gates:
        return "MoE router / gate: kept dense by default (name it with --include to prune it)"
    if module_name in prunable:
        return "not selected (include/exclude patterns, layer types)"
    kind = type(model.get_submodule(module_name)).__name__
    return f"{kind}.{param} is not a matmul layer prunekit prunes"


def block_coverage(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    stacks: tuple | None = None,
    reasons: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Sparsity over every weight matrix (2-D or more) inside the model's block lists, the selected layers'
    sparsity beside it, and each matrix left unpruned (name, shape, parameters, why; ``reasons`` by layer name where
    the run knows better than the defaults). Weights shared with a selected layer (a view of a fused tensor) count as
    covered."""
    reasons = reasons or {}
    stacks = find_stacks(model) if stacks is None else stacks
    if not stacks:
        return {"blocks": [], "note": "no block list found: coverage is the selected layers' own sparsity"}
    covered = {_storage(m.weight) for m in layers.values()}
    prunable = find_layers(model)
    gates = set(gate_modules(model))
    zeros = total = sel_zeros = sel_total = 0
    left = []
    for prefix, blocks in stacks:
        for name, p in blocks.named_parameters():
            if p.dim() < 2 or name.endswith("bias"):  # biases (also fused experts' [experts, out] ones)
                continue
            full = f"{prefix}.{name}" if prefix else name
            nzeros = count_zeros(p)
            zeros, total = zeros + nzeros, total + p.numel()
            if _storage(p) in covered:
                sel_zeros, sel_total = sel_zeros + nzeros, sel_total + p.numel()
            else:
                module_name, _, param = full.rpartition(".")
                reason = _reason(module_name, param, model, prunable, gates, reasons)
                left.append({"name": full, "shape": list(p.shape), "numel": p.numel(), "reason": reason})
    result = {
        "blocks": [prefix for prefix, _ in stacks],
        "block_sparsity": zeros / max(total, 1),
        "block_weights": total,
        "selected_block_sparsity": sel_zeros / max(sel_total, 1),
        "left_dense": left,
        "left_dense_params": sum(item["numel"] for item in left),
    }
    gap = result["selected_block_sparsity"] - result["block_sparsity"]
    if gap > WARN_GAP:
        result["warning"] = (
            f"only {result['block_sparsity']:.1%} of the weights inside the blocks are zero, against "
            f"{result['selected_block_sparsity']:.1%} in the selected layers: {len(left)} weight tensor(s) "
            f"({result['left_dense_params']:,} parameters) were left dense, e.g. {left[0]['name']} "
            f"({left[0]['reason']})"
        )
        log.warning(result["warning"])
    return result
