"""Gradients of the model's own loss over the calibration windows, for the gradient-based (Taylor) scores of
``width`` and ``depth``.

The loss is the model's own: next-token cross-entropy for causal LMs (and image-text-to-text models), the task
loss the model computes when a batch carries ``labels`` (classifiers, masked LMs, seq2seq), and cross-entropy
for an ``(inputs, labels)`` pair given to a plain PyTorch / timm classifier. Without one, a Taylor score is
refused before any work.

Windows go through the model one at a time, so the activations kept for the backward pass are one window's;
with ``checkpointing`` each block keeps only its input and recomputes its inside during the backward pass, so
at most one block's activations exist at once (plus the hidden state between blocks and the logits). Only
the scored weights require gradients; each one's gradient is added into a float32 sum as soon as it is
computed and then freed (``register_post_accumulate_grad_hook``), so the extra memory is 4 bytes per scored
weight (8 with the Fisher diagonal) and one weight's gradient at a time.

``grad`` is the mean over windows of each window's gradient (for windows of equal length, the gradient of the
mean loss over all their tokens, which LLM-Pruner backpropagates in one batch); ``fisher`` is the mean of the
squared per-window gradients (LLM-Pruner's ``acc_grad``, the diagonal of the empirical Fisher that stands in
for the Hessian).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..distributed import sum_over_ranks, together
from ..errors import PrunekitError
from ..forward import model_device, run_model
from ..graph import is_hf_model
from ..progress import progress

log = logging.getLogger(__name__)

CAUSAL_CLASSES = ("causal-lm", "image-text-to-text")  # the model classes whose models predict the next token
CAUSAL_MAPPINGS = ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES")
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass
class Gradients:
    """Per parameter name: the mean window gradient and, when asked, the mean squared window gradient."""

    grad: dict[str, torch.Tensor]
    fisher: dict[str, torch.Tensor] | None
    windows: int

    def nbytes(self) -> int:
        sums = [*self.grad.values(), *(self.fisher or {}).values()]
        return sum(t.numel() * t.element_size() for t in sums)


# ---------------------------------------------------------------- the model's own loss


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face model whose class predicts the next token (``*ForCausalLM``, LLaVA-style models): one that
    transformers lists as a causal LM or image-text-to-text model (the ``causal-lm`` and ``image-text-to-text``
    rows of ``prunekit.model_classes``), or whose remote-code class name says so."""
    if not is_hf_model(model):
        return False
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    for mapping in CAUSAL_MAPPINGS:
        for value in getattr(modeling_auto, mapping).values():
            if name in (value if isinstance(value, (list, tuple)) else (value,)):
                return True
    return name.endswith(CAUSAL_SUFFIXES)


def _labeled_pair(batch: Any) -> bool:
    return (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and isinstance(batch[1], torch.Tensor)
        and not batch[1].is_floating_point()
    )


def loss_kind(model: nn.Module, batch: Any) -> str:
    """Which loss the model has for ``batch`` (``labels``, ``causal`` or ``pair``); one line when none."""
    if isinstance(batch, Mapping) and "labels" in batch:
        return "labels"
    if is_causal_lm(model):
        return "causal"
    if not is_hf_model(model) and _labeled_pair(batch):
        return "pair"
    raise PrunekitError(
        f"a gradient (Taylor) score needs the model's own loss, and {type(model).__name__} has none for these "
        "calibration batches: give batches with labels ({'input_ids': ..., 'labels': ...} for Hugging Face "
        "models, (images, labels) pairs for timm / PyTorch classifiers) or choose a score without gradients"
    )


def causal_labels(batch: Any) -> dict[str, torch.Tensor]:
    """The batch as model keyword arguments with ``labels`` = its token ids (padding, where the attention mask
    is 0, ignored): the model shifts them and returns the mean next-token loss."""
    from .common import input_ids

    ids = input_ids(batch)
    kwargs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": ids}
    labels = ids.clone()
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
        labels[mask == 0] = -100
    kwargs["labels"] = labels
    return kwargs


def model_loss(model: nn.Module, batch: Any, kind: str) -> torch.Tensor:
    """The model's own loss on ``batch`` (a scalar with a graph back to the weights)."""
    device = model_device(model)
    if kind == "pair":
        inputs, labels = batch
        logits = model(inputs.to(device))
        return F.cross_entropy(logits.float(), labels.to(device))
    out = run_model(model, causal_labels(batch) if kind == "causal" else batch, device)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise PrunekitError(
            f"{type(model).__name__} returned no loss for batches with labels; a gradient (Taylor) score needs "
            "one: choose a score without gradients"
        )
    return loss


def windows(batches: Sequence) -> Iterator[Any]:
    """Every calibration window (row of a batch) as a batch of one."""
    for batch in batches:
        size = _batch_size(batch)
        for i in range(size):
            yield _row(batch, i, size)


def _batch_size(batch: Any) -> int:
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    return next(t.shape[0] for t in values if isinstance(t, torch.Tensor) and t.dim() > 0)


def _row(batch: Any, i: int, size: int) -> Any:
    def cut(value):
        batched = isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size
        return value[i : i + 1] if batched else value

    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(cut(v) for v in batch)
    return cut(batch)


# ---------------------------------------------------------------- temporary model changes


@contextmanager
def trainable(model: nn.Module, params: Mapping[str, nn.Parameter]):
    """Exactly ``params`` require gradients (the others' flags are restored afterwards)."""
    wanted = {id(p) for p in params.values()}
    before = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in before:
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for p, flag in before:
            p.requires_grad_(flag)
            p.grad = None


@contextmanager
def checkpointed(blocks: Sequence[nn.Module]):
    """Each block keeps only its input for the backward pass and recomputes its activations there
    (``torch.utils.checkpoint``, non-reentrant): one block's activations at a time instead of the model's."""
    originals = [b.__dict__.get("forward") for b in blocks]

    def wrap(forward):
        def call(*args, **kwargs):
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)

        return call

    try:
        for b in blocks:
            b.forward = wrap(b.forward)
        yield
    finally:
        for b, original in zip(blocks, originals):
            if original is None:
                del b.forward
            else:
                b.forward = original


@contextmanager
def summed_gradients(params: Mapping[str, nn.Parameter], fisher: bool):
    """Hooks that add each parameter's gradient (and its square) into float32 sums as soon as it is computed,
    then free it: the sums are yielded as ``(grad, fisher)`` dicts."""
    sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    squares = {n: torch.zeros_like(s) for n, s in sums.items()} if fisher else None

    def hook(name):
        def fn(p):
            g = p.grad.float()
            sums[name].add_(g)
            if squares is not None:
                squares[name].addcmul_(g, g)
            p.grad = None

        return fn

    with ExitStack() as stack:
        for name, p in params.items():
            stack.callback(p.register_post_accumulate_grad_hook(hook(name)).remove)
        yield sums, squares


def accumulate_gradients(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    batches: Sequence,
    fisher: bool = False,
    blocks: Sequence[nn.Module] = (),
) -> Gradients:
    """Mean gradient (and mean squared gradient) of the model's own loss with respect to ``params`` over the
    calibration windows, one window at a time (every rank's: the sums and the window count are added over the
    ranks of a distributed run); ``blocks`` are checkpointed (empty: keep all activations)."""
    kind = loss_kind(model, batches[0])
    count = torch.zeros(1, dtype=torch.float64)
    with ExitStack() as stack:
        stack.enter_context(together())
        stack.enter_context(torch.enable_grad())
        stack.enter_context(trainable(model, params))
        if blocks:
            stack.enter_context(checkpointed(blocks))
        sums, squares = stack.enter_context(summed_gradients(params, fisher))
        for window in progress(list(windows(batches)), "gradients", unit="window", inner=True):
            model_loss(model, window, kind).backward()
            count += 1
    sum_over_ranks(*sums.values(), *(squares or {}).values())
    sum_over_ranks(count)
    scale = 1.0 / max(float(count), 1.0)
    log.info("gradients of the %s loss over %d windows for %d tensors", kind, int(count), len(params))
    return Gradients(
        {n: s.mul_(scale) for n, s in sums.items()},
        {n: s.mul_(scale) for n, s in squares.items()} if squares is not None else None,
        int(count),
    )
