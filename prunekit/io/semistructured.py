"""2:4 semi-structured sparse inference on NVIDIA GPUs (compute capability 8.0+: Ampere and newer).

``torch.sparse.to_sparse_semi_structured`` compresses a 2:4 weight into the values + metadata layout
that the cuSPARSELt / CUTLASS sparse tensor-core kernels multiply directly, so a 2:4-pruned Linear
does about half the multiply work. Only those GPUs run it, in float16 / bfloat16; on anything else
the functions here raise and say so (a 2:4 model still runs everywhere as a dense model with zeros).
"""

from __future__ import annotations

import copy
import logging
import time

import torch
from torch import nn

from ..errors import PrunekitError
from ..forward import run_model
from .compact import is_2_4

log = logging.getLogger(__name__)

MIN_CAPABILITY = (8, 0)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def unsupported_reason(device: str | torch.device) -> str | None:
    """None when 2:4 kernels run on ``device``; otherwise why they do not."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return (
            f"2:4 semi-structured kernels need a CUDA GPU with compute capability >= 8.0 (Ampere or newer); "
            f"the model is on {device}. Move it with model.to('cuda') on such a GPU, or keep the dense "
            "model with zeros (it runs everywhere, without the speedup)"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (
            f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}; "
            "2:4 semi-structured kernels need 8.0 or newer (A100, H100, RTX 30xx/40xx)"
        )
    return None


def check_support(device: str | torch.device) -> None:
    reason = unsupported_reason(device)
    if reason is not None:
        raise PrunekitError(reason)


def semi_structured_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Linear layers whose weight keeps at most 2 of every 4 weights along the input dimension."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.weight.dim() == 2 and is_2_4(m.weight.detach().cpu())
    }


def _convert(name: str, module: nn.Linear) -> None:
    weight = module.weight.detach()
    if weight.dtype not in KERNEL_DTYPES:
        raise PrunekitError(
            f"layer {name!r} is {weight.dtype}; 2:4 kernels take float16 or bfloat16: convert the "
            "model first (model.half() or model.to(torch.bfloat16))"
        )
    try:
        sparse = torch.sparse.to_sparse_semi_structured(weight)
    except (RuntimeError, ValueError) as error:
        raise PrunekitError(
            f"layer {name!r} of shape {tuple(weight.shape)} cannot use 2:4 kernels ({error}); "
            "leave it out (pass layers=...)"
        ) from error
    module.weight = nn.Parameter(sparse, requires_grad=False)


def to_semi_structured(model: nn.Module, layers: dict[str, nn.Linear] | None = None) -> list[str]:
    """Replace the weights of 2:4-pruned Linear layers (default: all of them) by semi-structured sparse
    tensors, in place, for inference. Returns the converted layer names."""
    check_support(next(model.parameters()).device)
    chosen = semi_structured_layers(model) if layers is None else layers
    if not chosen:
        raise PrunekitError("no Linear layer has a 2:4 weight; prune with pattern='2:4' first")
    for name, module in chosen.items():
        _convert(name, module)
    log.info("converted %d Linear layers to 2:4 semi-structured", len(chosen))
    return list(chosen)


@torch.no_grad()
def tokens_per_second(model: nn.Module, tokens: torch.Tensor, iters: int = 10, warmup: int = 3) -> float:
    """Forward-pass throughput on ``tokens`` ``[batch, seqlen]`` (CUDA-synchronised wall time)."""
    for _ in range(warmup):
        run_model(model, tokens, None)
    torch.cuda.synchronize(tokens.device)
    start = time.perf_counter()
    for _ in range(iters):
        run_model(model, tokens, None)
    torch.cuda.synchronize(tokens.device)
    return tokens.numel() * iters / (time.perf_counter() - start)


@torch.no_grad()
def benchmark(
    model: nn.Module, batch_size: int = 8, seqlen: int = 512, iters: int = 10, warmup: int = 3, seed: int = 0
) -> dict[str, float | str]:
    """Tokens/s of a 2:4-pruned causal LM dense and after ``to_semi_structured`` (a copy), in the same run,
    plus the largest logit difference between the two (the kernels compute the same product)."""
    device = next(model.parameters()).device
    check_support(device)
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (batch_size, seqlen), generator=torch.Generator().manual_seed(seed)).to(device)
    dense_tps = tokens_per_second(model, tokens, iters, warmup)
    sparse = copy.deepcopy(model)
    converted = to_semi_structured(sparse)
    sparse_tps = tokens_per_second(sparse, tokens, iters, warmup)
    diff = model(tokens, use_cache=False).logits.float() - sparse(tokens, use_cache=False).logits.float()
    diff = diff.abs().max().item()
    return {
        "device": torch.cuda.get_device_name(device),
        "dtype": str(next(model.parameters()).dtype),
        "batch_size": batch_size,
        "seqlen": seqlen,
        "layers": len(converted),
        "dense_tokens_per_s": dense_tps,
        "semi_structured_tokens_per_s": sparse_tps,
        "speedup": sparse_tps / dense_tps,
        "max_abs_logit_diff": diff,
    }
