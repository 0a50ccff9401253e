"""Turn whatever the user calls calibration data into a list of model-input batches."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..errors import PrunekitError
from .text import load_text, random_windows, tokenize


def calibration_batches(
    calib: Any, tokenizer: Any = None, nsamples: int = 128, seqlen: int = 2048, seed: int = 0, batch_size: int = 8
) -> list[Any]:
    """Batches for the engine from: a LongTensor ``[nsamples, seqlen]``, an iterable / DataLoader of
    batches (tensors, tuples or dicts of model inputs), or a text path / dataset name (needs ``tokenizer``)."""
    if calib is None:
        raise PrunekitError(
            "this method needs calibration data: pass calib= (token tensor, batches or a text path) or --calib-data"
        )
    if isinstance(calib, (str, os.PathLike)):
        if tokenizer is None:
            raise PrunekitError("calibration from text needs a tokenizer (tokenizer=...)")
        calib = random_windows(tokenize(tokenizer, load_text(calib, what="calibration data")), nsamples, seqlen, seed)
    if isinstance(calib, torch.Tensor):
        return _split_tensor(calib, batch_size)
    if isinstance(calib, Iterable) and not isinstance(calib, Mapping):
        batches = list(calib)
        if not batches:
            raise PrunekitError("calibration data is empty")
        return batches
    return [calib]


def _split_tensor(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.numel() == 0:
        raise PrunekitError("calibration tensor is empty")
    return list(tokens.split(batch_size))
