"""The dtypes prunekit loads a checkpoint in, by the names settings accept (``auto``: as stored).

Below the config and the loaders alike, and free of torch at import time (the CLI's ``--help`` imports the
config)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import PrunekitError

if TYPE_CHECKING:  # pragma: no cover
    import torch

ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype a name stands for; None for ``auto`` (as stored) and for None."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return None if dtype == "auto" else dtype
    if dtype not in DTYPES:
        names = ", ".join(d for d in DTYPES if d != "auto")
        raise PrunekitError(f"unknown dtype {dtype!r}; choose from {names} or 'auto'")
    return getattr(torch, ALIASES.get(dtype, dtype))
