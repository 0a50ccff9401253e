"""Helpers shared by the structural methods: find the block list, count parameters, run calibration
batches, cut Linear layers, and keep a Hugging Face config in step with the modules it describes.

The structural methods change shapes, so whatever describes those shapes (``config.num_hidden_layers``,
``intermediate_size``, head counts, ``hidden_size``) must change with them, or ``from_pretrained`` would
build the old architecture and refuse the smaller checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import PrunekitError
from ..forward import model_device, run_model
from ..graph import find_blocks


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList | nn.Sequential]:
    """The model's repeated blocks (decoder layers, ViT blocks) as ``(name, container)``."""
    found = find_blocks(model)
    if found is None:
        raise PrunekitError(
            f"{type(model).__name__} has no list of repeated blocks holding most of its weights "
            "(decoder layers, ViT blocks); structured pruning needs one"
        )
    return found


def count_params(module: nn.Module) -> int:
    """Number of parameters, counting shared (tied) tensors once."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


@torch.no_grad()
def forward(model: nn.Module, batch: Any) -> Any:
    """Run one calibration batch (tensor, tuple or dict of inputs) through the model where it is."""
    return run_model(model, batch, model_device(model))


def input_ids(batch: Any) -> torch.Tensor:
    """The token ids of a causal-LM calibration batch (a LongTensor or a dict with ``input_ids``)."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    if isinstance(ids, (tuple, list)):
        ids = ids[0]
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
        raise PrunekitError("this score needs causal-LM batches of token ids (a LongTensor or {'input_ids': ...})")
    return ids


def check_ratio(ratio: float) -> float:
    if not 0.0 <= float(ratio) < 1.0:
        raise PrunekitError(f"ratio (fraction of parameters to remove) must be in [0, 1), got {ratio}")
    return float(ratio)


def check_batches(batches: Sequence, method: str) -> None:
    if not batches:
        raise PrunekitError(f"structured method {method!r} needs calibration batches (calib=... / --calib-data)")


@torch.no_grad()
def slice_linear(linear: nn.Linear, keep: torch.Tensor, dim: int) -> None:
    """Keep only the output rows (``dim=0``) or input columns (``dim=1``) listed in ``keep``, in place."""
    keep = keep.to(linear.weight.device)
    grad = linear.weight.requires_grad
    linear.weight = nn.Parameter(linear.weight.index_select(dim, keep).clone(), requires_grad=grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias[keep].clone(), requires_grad=linear.bias.requires_grad)
        linear.out_features = keep.numel()
    else:
        linear.in_features = keep.numel()


def hf_config(model: nn.Module):
    """The Hugging Face config of ``model``, or None for plain PyTorch / timm models."""
    config = getattr(model, "config", None)
    return config if hasattr(config, "to_dict") else None


def _validation_errors() -> tuple[type[Exception], ...]:
    try:  # transformers 5 configs are strict dataclasses, whose validators raise this
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # pragma: no cover
        return ValueError, TypeError
    return ValueError, TypeError, StrictDataclassError


def config_accepts(model: nn.Module, values: Mapping[str, Any]) -> bool:
    """Whether the model's config class accepts ``values``: transformers validates configs when saving and
    loading (LlamaConfig wants ``hidden_size % num_attention_heads == 0``), so a shape it rejects is one the
    pruned model could not be saved with. Models without an HF config accept anything."""
    config = hf_config(model)
    if config is None:
        return True
    trial = copy.deepcopy(config)
    try:
        for key, value in values.items():
            setattr(trial, key, value)
        if callable(getattr(trial, "validate", None)):
            trial.validate()
    except _validation_errors():
        return False
    return True


def set_config(model: nn.Module, values: Mapping[str, Any]) -> None:
    config = hf_config(model)
    if config is not None:
        for key, value in values.items():
            setattr(config, key, value)


def summary(before: int, after: int, total_before: int, total_after: int, **extra) -> dict:
    """The JSON-able report every structural method returns: what it removed, as counts and fractions."""
    return {
        "params_before": before,
        "params_after": after,
        "removed_fraction": (before - after) / max(before, 1),
        "model_params_before": total_before,
        "model_params_after": total_after,
        "model_removed_fraction": (total_before - total_after) / max(total_before, 1),
        **extra,
    }
