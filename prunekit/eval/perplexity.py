"""Perplexity as the papers report it: tokenise the joined test text once, cut it into non-overlapping
``seqlen`` windows (the tail shorter than a window is dropped), ppl = exp(mean token NLL).

Every window has the same length, so the mean token NLL equals the mean of per-window losses, which is
what the Wanda/SparseGPT evaluation computes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PrunekitError
from ..forward import eval_mode, model_device, on_device, run_model
from ..progress import progress


def token_windows(tokens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Non-overlapping windows ``[n, seqlen]`` of a 1-D token tensor."""
    n = tokens.numel() // seqlen
    if n == 0:
        raise PrunekitError(f"evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    return tokens[: n * seqlen].view(n, seqlen)


def window_nll(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (float32) of each window, ``[batch]``; a window predicts seqlen-1 tokens."""
    logits = model(input_ids=windows).logits[:, :-1].float()
    targets = windows[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape).sum(dim=1)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int = 2048,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> float:
    """Perplexity of ``model`` over the 1-D ``tokens`` in non-overlapping windows."""
    windows = token_windows(tokens, seqlen)
    device = torch.device(device) if device is not None else model_device(model)
    total = 0.0
    with on_device(model, device), eval_mode(model):
        for batch in progress(windows.split(batch_size), "perplexity", unit="batch", inner=True):
            total += window_nll(model, batch.to(device)).double().sum().item()
    return math.exp(total / (windows.shape[0] * (seqlen - 1)))


def labeled_nll(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[float, int]:
    """Summed NLL (float64) and count of the labeled tokens (``-100`` skipped). ``shift``: position t predicts
    label t+1 (decoders reading their own text); else position t predicts label t (masked LMs, the decoder of an
    encoder-decoder, which is fed its targets shifted right)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    return float(nll.double()), int((labels != -100).sum())


@torch.no_grad()
def labeled_perplexity(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], shift: bool, device: str | torch.device | None = None
) -> float:
    """exp(mean NLL) over the ``labels`` of input batches: masked-LM pseudo-perplexity, an encoder-decoder's
    decoder perplexity, a vision-language model's text perplexity given the image."""
    device = torch.device(device) if device is not None else model_device(model)
    total, count = 0.0, 0
    with on_device(model, device), eval_mode(model):
        for batch in progress(batches, "perplexity", unit="batch", inner=True):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            nll, n = labeled_nll(run_model(model, inputs, device).logits, batch["labels"].to(device), shift)
            total, count = total + nll, count + n
    if count == 0:
        raise PrunekitError("the evaluation data has no tokens to score; give more text")
    return math.exp(total / count)
