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
from .moe import gate_modules, unknown_experts

log = logging.getLogger(__name__)

# Block and selected-layer sparsity may differ by this much before a run warns (dense norms, biases and small
# tensors sit in the blocks too; a few points is normal, more means weights were left out).
WARN_GAP = 0.03
NOT_SELECTED = "not selected (include/exclude patterns, layer types)"


def _storage(tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _reason(
    module_name: str, param: str, model: nn.Module, prunable: Mapping[str, nn.Module], gates: set, reasons: Mapping
) -> str:
    if module_name in reasons:  # the run knows better: a layer no calibration input reached
        return reasons[module_name]
    if module_name in gates:
        return "MoE router / gate: kept dense by default (name it with --include to prune it)"
    if module_name in prunable:  # also fused experts of an unknown layout: selecting them is refused
        return NOT_SELECTED
    kind = type(model.get_submodule(module_name)).__name__
    return f"{kind}.{param} is not a matmul layer prunekit prunes"


class Coverage:
    """Counts zeros over every weight matrix (2-D or more) of the blocks it is shown, the selected layers' beside
    them, and each matrix left unpruned (name, shape, parameters, why). Weights shared with a selected layer (a
    view of a fused tensor) count as covered. Blocks are added one at a time, so a lazy run that holds one block
    at a time counts the same as an in-memory one."""

    def __init__(self, model: nn.Module, layers: Mapping[str, nn.Module], reasons: Mapping[str, str] | None = None):
        self.model, self.layers, self.reasons = model, layers, reasons or {}
        self.prunable = {**find_layers(model), **unknown_experts(model)}
        self.gates = set(gate_modules(model))
        self.zeros = self.total = self.selected_zeros = self.selected_total = 0
        self.left: list[dict[str, Any]] = []

    def add(self, prefix: str, module: nn.Module) -> None:
        """The weights of ``module`` (a block, or a whole block list), named below ``prefix``; it must hold real
        tensors now (a lazy run's current block)."""
        covered = {_storage(m.weight) for name, m in self.layers.items() if not prefix or name.startswith(f"{prefix}.")}
        for name, p in module.named_parameters():
            if p.dim() < 2 or name.endswith("bias"):  # biases (also fused experts' [experts, out] ones)
                continue
            full = f"{prefix}.{name}" if prefix else name
            nzeros = count_zeros(p)
            self.zeros, self.total = self.zeros + nzeros, self.total + p.numel()
            if _storage(p) in covered:
                self.selected_zeros, self.selected_total = self.selected_zeros + nzeros, self.selected_total + p.numel()
            else:
                module_name, _, param = full.rpartition(".")
                reason = _reason(module_name, param, self.model, self.prunable, self.gates, self.reasons)
                self.left.append({"name": full, "shape": list(p.shape), "numel": p.numel(), "reason": reason})

    def result(self, blocks: list[str]) -> dict[str, Any]:
        """The report's ``coverage`` section (and a logged warning when much was left dense)."""
        if not blocks:
            return {"blocks": [], "note": "no block list found: coverage is the selected layers' own sparsity"}
        left = self.left
        result = {
            "blocks": blocks,
            "block_sparsity": self.zeros / max(self.total, 1),
            "block_weights": self.total,
            "selected_block_sparsity": self.selected_zeros / max(self.selected_total, 1),
            "left_dense": left,
            "left_dense_params": sum(item["numel"] for item in left),
        }
        # Weights the user chose to keep dense (patterns, layer types) are not a surprise: only the others warn.
        unasked = [item for item in left if item["reason"] != NOT_SELECTED]
        chosen = result["left_dense_params"] - sum(item["numel"] for item in unasked)
        gap = result["selected_block_sparsity"] - self.zeros / max(self.total - chosen, 1)
        if gap > WARN_GAP and unasked:
            result["warning"] = (
                f"only {result['block_sparsity']:.1%} of the weights inside the blocks are zero, against "
                f"{result['selected_block_sparsity']:.1%} in the selected layers: {len(unasked)} weight tensor(s) "
                f"({result['left_dense_params'] - chosen:,} parameters) were left dense that no setting excluded, "
                f"e.g. {unasked[0]['name']} ({unasked[0]['reason']})"
            )
            log.warning(result["warning"])
        return result


def block_coverage(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    stacks: tuple | None = None,
    reasons: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``Coverage`` of every block list of the model (found, or ``stacks``), after pruning; ``reasons`` by layer name
    where the run knows why a layer was left dense."""
    stacks = find_stacks(model) if stacks is None else stacks
    counter = Coverage(model, layers, reasons)
    for prefix, blocks in stacks:
        counter.add(prefix, blocks)
    return counter.result([prefix for prefix, _ in stacks])
