"""Hugging Face causal LMs: load from a local directory or hub id (no remote code unless asked), save as
safetensors with the tokenizer."""
from __future__ import annotations
from ..errors import PrunekitError

import os
from pathlib import Path

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return None if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise PrunekitError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def check_model_source(source: str | os.PathLike) -> None:
    """A path that looks local must exist; anything else is treated as a hub id."""
    text = str(source)
    if not Path(text).expanduser().exists() and (text.startswith((".", "/", "~")) or os.sep in text.strip("/")
                                                 and text.count("/") > 1):
        raise PrunekitError(f"model path {text!r} does not exist; give a local checkpoint directory or a "
                                "hub id like 'org/name'")


def load_causal_lm(source: str | os.PathLike, dtype: str | torch.dtype | None = None,
                   trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM
    check_model_source(source)
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=parse_dtype(dtype) or "auto",
                                                 trust_remote_code=trust_remote_code)
    return model.eval()


def load_tokenizer(source: str | os.PathLike, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    check_model_source(source)
    return AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)


def save_causal_lm(model: nn.Module, tokenizer, out_dir: str | os.PathLike) -> None:
    """``save_pretrained`` with safetensors (and the tokenizer, when there is one) into ``out_dir``."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
