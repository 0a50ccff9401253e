"""Which structured methods work on which architectures, found by trying rather than by a hand-kept list:
each method prunes the tiny model of each architecture in ``prunekit.testing.zoo``, and counts as supported
only if the result saves, reloads with ``from_pretrained`` and gives the same logits as the pruned model.

    from prunekit.structured.support import structured_support, support_table
    structured_support()   # {"llama": {"depth": True, "width": True, "slicegpt": True}, "gpt2": {...}, ...}
    support_table()        # the same, with None for supported and the one-line reason otherwise

A method that refuses an architecture does so with a one-line ``PrunekitError`` before touching the model;
that line is the reason given here.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import PrunekitError
from ..testing import zoo
from .base import STRUCTURED
from .common import forward

METHODS = ("depth", "width", "slicegpt")
RATIO = 0.3


def prune_zoo_model(arch: str, method: str, ratio: float = RATIO, params: dict | None = None):
    """The tiny ``arch`` model pruned by ``method``, with its calibration batch and the method's summary.
    Raises the method's ``PrunekitError`` when it refuses the architecture."""
    model, batch = zoo.build(arch), zoo.batch(arch, zoo.token_ids())
    summary = STRUCTURED.create(method, params or {}).prune_model(model, [batch], ratio)
    return model, batch, summary


def reloaded(model: nn.Module) -> nn.Module:
    """``model`` after ``save_pretrained`` and ``from_pretrained`` (of its own class), in eval mode."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return type(model).from_pretrained(folder).eval()


@torch.no_grad()
def same_logits(a: nn.Module, b: nn.Module, batch) -> bool:
    return torch.equal(forward(a, batch).logits, forward(b, batch).logits)


def try_method(arch: str, method: str, ratio: float = RATIO) -> str | None:
    """None when ``method`` (default settings) prunes ``arch`` into a model that reloads identically, else why not."""
    try:
        model, batch, _ = prune_zoo_model(arch, method, ratio)
    except PrunekitError as err:
        return str(err)
    if not same_logits(model, reloaded(model), batch):
        return "the pruned model does not reload with the same logits"
    return None


def support_table(archs: Iterable[str] | None = None, methods: Iterable[str] = METHODS) -> dict[str, dict]:
    """``{arch: {method: None or the reason it is not supported}}`` over the zoo (or ``archs``)."""
    return {arch: {m: try_method(arch, m) for m in methods} for arch in (archs or zoo.ZOO)}


def structured_support(archs: Iterable[str] | None = None, methods: Iterable[str] = METHODS) -> dict[str, dict]:
    """``{arch: {method: supported}}``: the architecture table of the README."""
    return {arch: {m: why is None for m, why in row.items()} for arch, row in support_table(archs, methods).items()}
