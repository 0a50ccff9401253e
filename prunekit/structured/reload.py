"""Whether a structurally pruned model reloads as itself: what its config describes, rebuilt on the meta device
(``from_pretrained``'s model, or ``prunekit.load``'s where the layers take the stored weights' sizes), compared
module by module, so a change that would not survive a save / load round trip is refused before it is made."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from ..errors import PrunekitError
from ..shapes import sized_by_weights
from .common import arch_name, hf_config, validation_errors
from .layer_sizes import take_stored_sizes


def rebuilt(model: nn.Module) -> nn.Module:
    """What loading builds from the model's config after a save / load round trip of that config, on the meta
    device (no weights, no memory): ``from_pretrained``'s model, or ``prunekit.load``'s where the config says the
    layers take the stored weights' sizes (``prunekit.shapes``)."""
    config = hf_config(model)
    config = type(config).from_dict(config.to_dict())
    with torch.device("meta"):
        built = type(model)._from_config(config)
    if sized_by_weights(config):
        take_stored_sizes(built, {name: tuple(t.shape) for name, t in model.state_dict().items()})
    return built


_IGNORED_ATTRIBUTES = ("training", "layer_idx")  # layer_idx is renumbered by depth pruning


def _facets(module: nn.Module) -> dict[str, Any]:
    facets: dict[str, Any] = {"class": type(module).__name__}
    for name, t in itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
        facets[name] = tuple(t.shape)
    for key, value in vars(module).items():
        if not key.startswith("_") and key not in _IGNORED_ATTRIBUTES and isinstance(value, (bool, int, float, str)):
            facets[key] = value
    return facets


def signature(module: nn.Module) -> dict[str, dict[str, Any]]:
    """Per submodule: its class, its own tensors' shapes, and its scalar attributes (sliding window, head
    counts, epsilons): what must agree between a pruned model and the one its config describes."""
    return {name: _facets(m) for name, m in module.named_modules()}


def differences(actual: nn.Module, expected: nn.Module, limit: int = 3) -> list[str]:
    """Where two modules' signatures differ, as ``module.facet: actual != expected`` (at most ``limit``)."""
    a, e = signature(actual), signature(expected)
    found = []
    for name in sorted(set(a) | set(e), key=lambda n: (n.count("."), n)):
        fa, fe, where = a.get(name, {}), e.get(name, {}), f"{name}." if name else ""
        found += [f"{where}{k}: {fa.get(k)} != {fe.get(k)}" for k in sorted({*fa, *fe}) if fa.get(k) != fe.get(k)]
    return found[:limit]


def ensure_reloadable(pruned: nn.Module, method: str) -> None:
    """Raise unless the (rehearsed, meta) ``pruned`` model is exactly what its config describes, so that
    ``save_pretrained`` / ``from_pretrained`` give back the same model. Models without an HF config pass."""
    if hf_config(pruned) is None:
        return
    try:
        expected = rebuilt(pruned)
    except (*validation_errors(), AttributeError) as err:  # DINOv2's backbone stage names; GPT-2: hidden % heads
        raise PrunekitError(
            f"{arch_name(pruned)}: {method} would leave a config transformers rejects, so it would not reload "
            f"({' '.join(str(err).split())[:200]})"
        ) from None
    diff = differences(pruned, expected)
    if diff:
        raise PrunekitError(
            f"{arch_name(pruned)}: {method} would leave a model its config cannot describe, so it would not "
            f"reload ({'; '.join(diff)})"
        )
