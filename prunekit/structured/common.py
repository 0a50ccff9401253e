"""Helpers shared by the structural methods: find the block list, count parameters, run calibration
batches, cut Linear layers, and keep a Hugging Face config in step with the modules it describes.

The structural methods change shapes, so whatever describes those shapes (``config.num_hidden_layers``,
``intermediate_size``, head counts, ``hidden_size``) must change with them, or ``from_pretrained`` would
build the old architecture and refuse the smaller checkpoint.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..architectures import family
from ..errors import PrunekitError
from ..forward import model_device, run_model
from ..graph import HFConv1D, find_blocks
from ..moe import find_experts, unknown_experts


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
def slice_linear(linear: nn.Module, keep: torch.Tensor, dim: int) -> None:
    """Keep only the output rows (``dim=0``) or input columns (``dim=1``) listed in ``keep``, in place.
    ``dim`` counts in the ``[out, in]`` view, also for HF ``Conv1D``, which stores its weight transposed."""
    keep = keep.to(linear.weight.device)
    conv1d = isinstance(linear, HFConv1D)
    grad = linear.weight.requires_grad
    linear.weight = nn.Parameter(linear.weight.index_select(1 - dim if conv1d else dim, keep).clone(), grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias[keep].clone(), requires_grad=linear.bias.requires_grad)
        setattr(linear, "nf" if conv1d else "out_features", keep.numel())
    else:
        setattr(linear, "nx" if conv1d else "in_features", keep.numel())


def hf_config(model: nn.Module):
    """The Hugging Face config of ``model``, or None for plain PyTorch / timm models."""
    config = getattr(model, "config", None)
    return config if hasattr(config, "to_dict") else None


def arch_name(model: nn.Module) -> str:
    """How errors name an architecture: the HF ``model_type`` (``gemma2``), else the class name."""
    return getattr(hf_config(model), "model_type", "") or type(model).__name__


def mlp_size_key(model: nn.Module) -> str | None:
    """The config entry that holds the MLP width (None without an HF config: timm models have none)."""
    return family(arch_name(model)).mlp_size if hf_config(model) is not None else None


@contextmanager
def refusals_named(model: nn.Module):
    """A refusal raised in the body names the architecture it refuses (``swin: ...``), as every structured method's
    own refusals do."""
    try:
        yield
    except PrunekitError as err:
        arch = arch_name(model)
        if str(err).startswith(f"{arch}: "):
            raise
        raise PrunekitError(f"{arch}: {err}") from None


def block_config(model: nn.Module, prefix: str):
    """The HF config that sizes the blocks at ``prefix``: that of the nearest module above them that has one
    (LLaVA: the language model's, which is the saved ``text_config``; T5: a stack's private copy)."""
    found = hf_config(model)
    parts = prefix.split(".")
    for i in range(1, len(parts)):
        found = hf_config(model.get_submodule(".".join(parts[:i]))) or found
    return found


def is_saved(model: nn.Module, config) -> bool:
    """Whether ``config`` is what ``save_pretrained`` writes: the model's config or one of its sub-configs.
    T5's stacks hold private copies; sizes written there would not survive a reload."""
    root = hf_config(model)
    return config is root or any(config is getattr(root, name, None) for name in getattr(root, "sub_configs", {}))


def experts_module(blocks: nn.Module) -> nn.Module | None:
    """The first mixture-of-experts layer in the blocks (a module with ``experts``), else the first fused experts
    module (of a known layout or not: JetMoE's MLP calls its experts ``input_linear``), or None."""
    found = next((m for m in blocks.modules() if isinstance(getattr(m, "experts", None), nn.Module)), None)
    return found or next(iter({**find_experts(blocks), **unknown_experts(blocks)}.values()), None)


def check_resizable(model: nn.Module, prefix: str, blocks: nn.Module, method: str) -> None:
    """Width and slicegpt change sizes the config holds once for all blocks. Refuse, before any work, blocks
    with mixture-of-experts layers (fused 3-D expert tensors) and blocks sized by a config copy that is not
    saved (T5: the other stack shares the sizes)."""
    arch, moe = arch_name(model), experts_module(blocks)
    if moe is not None:
        raise PrunekitError(
            f"{arch}: {method} does not support mixture-of-experts blocks ({type(moe).__name__}, fused expert "
            "tensors); remove whole blocks with depth instead"
        )
    config = block_config(model, prefix)
    if config is not None and not is_saved(model, config):
        raise PrunekitError(
            f"{arch}: {method} cannot resize {prefix}: its sizes come from a config copy that another stack shares "
            "and save_pretrained does not write"
        )


# ---------------------------------------------------------------- will it reload?


def meta_clone(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (and its config) whose tensors are on the meta device: the structure without the
    data, so a structural change can be rehearsed on it at no memory cost. Tied tensors stay tied."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        meta = t.to("meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def validation_errors() -> tuple[type[Exception], ...]:
    try:  # transformers 5 configs are strict dataclasses, whose validators raise this
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # pragma: no cover
        return ValueError, TypeError
    return ValueError, TypeError, StrictDataclassError


def config_accepts(config, values: Mapping[str, Any]) -> bool:
    """Whether ``config``'s class accepts ``values``: transformers validates configs when saving and
    loading (LlamaConfig wants ``hidden_size % num_attention_heads == 0``), so a shape it rejects is one the
    pruned model could not be saved with. Models without an HF config (None) accept anything."""
    if config is None:
        return True
    trial = copy.deepcopy(config)
    try:
        for key, value in values.items():
            setattr(trial, key, value)
        if callable(getattr(trial, "validate", None)):
            trial.validate()
    except (*validation_errors(), AttributeError):  # AttributeError: a read-only property (Falcon's head_dim)
        return False
    return True


def set_config(config, values: Mapping[str, Any]) -> None:
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
