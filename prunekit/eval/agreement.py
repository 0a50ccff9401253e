"""Metrics for models without a perplexity: a classifier's accuracy on labeled text, or, without labels, how
often the pruned model predicts what the dense one predicted; an encoder's embeddings compared with the dense
encoder's by cosine similarity. The dense outputs are the reference, computed once before pruning."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.inputs import Inputs
from ..forward import eval_mode, model_device, on_device, run_model
from ..progress import progress


@torch.no_grad()
def _outputs(model: nn.Module, batches: list[Inputs], device: str | torch.device | None, pick) -> torch.Tensor:
    """``pick(output, batch)`` of every batch, concatenated on the CPU."""
    device = torch.device(device) if device is not None else model_device(model)
    with on_device(model, device), eval_mode(model):
        return torch.cat(
            [
                pick(run_model(model, b, device), b).float().cpu()
                for b in progress(batches, "evaluating", unit="batch", inner=True)
            ]
        )


def predictions(model: nn.Module, batches: list[Inputs], device: str | torch.device | None = None) -> torch.Tensor:
    """The predicted class of every example (argmax of the logits)."""
    return _outputs(model, batches, device, lambda out, batch: out.logits.argmax(-1)).long()


def fraction_equal(a: torch.Tensor, b: torch.Tensor) -> float:
    """Accuracy against labels, or agreement against the dense model's predictions."""
    return float((a == b).float().mean())


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One embedding per example: the mean of its token states, padding left out."""
    weights = attention_mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def embeddings(model: nn.Module, batches: list[Inputs], device: str | torch.device | None = None) -> torch.Tensor:
    """``[examples, hidden]``: the mean-pooled last hidden state of every example."""
    return _outputs(
        model, batches, device, lambda out, batch: mean_pooled(out.last_hidden_state.float(), batch["attention_mask"])
    )


def pooled(out) -> torch.Tensor:
    """One embedding per example from a bare encoder's output: its pooled output (DINOv2's normalised class token,
    a ConvNeXt's pooled features), else the mean of its last hidden state over positions (an audio encoder)."""
    pooler = getattr(out, "pooler_output", None)
    if isinstance(pooler, torch.Tensor) and pooler.dim() == 2:
        return pooler
    hidden = out.last_hidden_state
    return hidden.mean(1) if hidden.dim() == 3 else hidden.flatten(2).mean(-1)


def image_embeddings(model: nn.Module, batches: list[Inputs], device: str | torch.device | None = None) -> torch.Tensor:
    """``[examples, hidden]``: the pooled embedding of every image (or sound) of a bare encoder."""
    return _outputs(model, batches, device, lambda out, batch: pooled(out).float())


def mean_cosine(reference: torch.Tensor, current: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows: 1.0 when the pruned encoder embeds every example as before."""
    return float(F.cosine_similarity(reference, current, dim=-1).mean())
