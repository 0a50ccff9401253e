"""LoRA recovery for pruned models with peft: adapters on the pruned layers, then merge without losing
the sparsity.

LoRA's update ``dW = s B A`` is dense, so ``merge_and_unload`` would fill the pruned positions; the merged
weight is multiplied by the base model's keep mask again (``merge_lora_keep_sparsity``). Trained plainly, the
adapters also learn to use the pruned positions, and re-masking drops that part, so the merged model is
worse than the adapted one. ``add_lora(..., masks=...)`` trains a masked delta instead (``dW * M`` in every
forward pass), so the merged model is exactly the model that was trained.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import PrunekitError
from ..graph import select_layers
from ..masks import apply_masks, masks_from_weights

log = logging.getLogger(__name__)


def lora_targets(
    model: nn.Module,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    layer_types: Iterable[str] = ("linear",),
) -> list[str]:
    """The module-name suffixes peft should adapt: those of the layers prunekit prunes by default
    (``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj`` on Llama; the head stays out)."""
    names = select_layers(model, include, exclude, layer_types)
    return sorted({name.rsplit(".", 1)[-1] for name in names})


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: Iterable[str] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Wrap ``model`` in peft LoRA adapters (base weights frozen); targets default to ``lora_targets``.
    With ``masks`` (``keep_masks(model)``) the adapters train a masked delta (``mask_lora_deltas``)."""
    from peft import LoraConfig, get_peft_model

    targets = list(target_modules) if target_modules else lora_targets(model)
    if not targets:
        raise PrunekitError("no LoRA target modules: the model has no prunable Linear layers; pass target_modules")
    if masks is not None and dropout:
        raise PrunekitError("a masked LoRA delta needs lora dropout 0 (the mask is applied to the undropped input)")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("LoRA r=%d on %s: %d trainable parameters", r, ",".join(targets), trainable)
    if masks is not None:
        mask_lora_deltas(peft_model, masks)
    return peft_model


def mask_lora_deltas(peft_model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[RemovableHandle]:
    """Keep every adapter's update off the pruned positions: each adapted layer outputs its LoRA result minus
    ``x (dW * ~M)^T``, i.e. ``base(x) + x (dW * M)^T``. One extra matmul per layer, and ``dW`` is formed."""
    layers = dict(peft_model.get_base_model().named_modules())
    handles = [
        layers[name].register_forward_hook(_masked_delta_hook(~mask))
        for name, mask in masks.items()
        if hasattr(layers.get(name), "get_delta_weight")
    ]
    if not handles:
        raise PrunekitError("no adapted layer has a mask: take the masks with keep_masks(model) before add_lora")
    return handles


def _masked_delta_hook(pruned: torch.Tensor):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if module.disable_adapters or module.merged:
            return output
        delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
        return output - F.linear(args[0], (delta * pruned).to(args[0].dtype))

    return hook


def keep_masks(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """``weight != 0`` of the pruned layers of the base model (all prunable layers with any zero by default),
    keyed by module name; take them before ``add_lora``."""
    layers = dict(model.named_modules())
    if names is not None:
        return masks_from_weights({n: layers[n] for n in names})
    masks = masks_from_weights(select_layers(model, layer_types=("all",), keep_head=False, keep_stem=False))
    return {n: m for n, m in masks.items() if not bool(m.all())}


@torch.no_grad()
def merge_lora_keep_sparsity(peft_model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """``merge_and_unload`` then re-apply the base model's keep masks: the merged model has exactly the
    base model's zeros, and its state dict the base model's keys."""
    merged = peft_model.merge_and_unload()
    layers = dict(merged.named_modules())
    missing = [n for n in masks if n not in layers]
    if missing:
        raise PrunekitError(
            f"masks name layers the merged model does not have: {missing[:5]}; take the masks from "
            "the base model before wrapping it (keep_masks(model))"
        )
    apply_masks({n: layers[n] for n in masks}, {n: m.to(layers[n].weight.device) for n, m in masks.items()})
    return merged
