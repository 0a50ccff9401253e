"""SliceGPT-style slicing of the residual stream, with one global rotation, saved as a plain
``LlamaForCausalLM`` whose ``hidden_size`` is smaller.

1. Fold every RMSNorm's scale into the Linear layers that read its output (q/k/v, gate/up, lm_head). The norms
   are then scale-free, and a scale-free RMSNorm commutes with any orthogonal ``Q``: ``RMSNorm(xQ) = RMSNorm(x) Q``
   because ``||xQ|| = ||x||`` (computational invariance).
2. ``Q`` = eigenvectors, by decreasing eigenvalue, of ``sum x^T x`` over the inputs of every norm (two per block
   and the final one), each token first divided by its RMS, so the PCA weighs tokens as the layers see them.
3. Rotate the residual stream: embeddings ``E Q``, readers ``W Q``, writers (o_proj, down_proj) ``Q^T W`` and their
   biases ``b Q``. With all of ``Q`` this changes nothing (up to float rounding).
4. Slice: keep the first ``d'`` columns of ``Q``, ``d'`` the width nearest ``d (1 - ratio)`` that the config
   accepts (a multiple of ``num_attention_heads`` for LlamaConfig); every Linear loses the dropped residual
   dimensions, so about ``ratio`` of the decoder-layer parameters go (embeddings and head shrink too).
5. Norms over the sliced stream: SliceGPT's ``RMSN`` divides ``||x'||^2`` by the original ``d``, so that norms
   keep the scale they had when the dropped directions (small by construction) were there. A plain RMSNorm
   over ``d'`` with weight ``sqrt(d/d')`` and epsilon ``eps d/d'`` computes exactly that:
   ``sqrt(d/d') x' / sqrt(||x'||^2/d' + eps d/d') = x' / sqrt(||x'||^2/d + eps)``.
   So the config takes ``hidden_size = d'``, ``rms_norm_eps = eps d/d'`` and an explicit ``head_dim``, and the
   checkpoint loads with ``from_pretrained``: no custom class, no ``trust_remote_code``.

Why one global ``Q`` and not one per block as in SliceGPT: per-block rotations need a ``Q_l^T Q_(l+1)`` matrix
on each residual shortcut, which a ``LlamaForCausalLM`` has no place for. With one ``Q`` the shortcuts stay
identities. The cost is that one basis must serve every layer, so a slice removes somewhat more signal than
SliceGPT's per-block bases would.

Supported: LLaMA-style decoders (``input_layernorm`` -> ``self_attn.{q,k,v}_proj`` ... ``o_proj``,
``post_attention_layernorm`` -> ``mlp.{gate,up}_proj`` ... ``down_proj``, final ``norm``, ``lm_head``) with
``weight * x / rms(x)`` norms (LLaMA, Mistral, Qwen2/3); the norm formula is checked numerically.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import PrunekitError
from ..forward import hooks
from .base import ModelMethod, register_structured
from .common import (
    block_list,
    check_batches,
    check_ratio,
    config_accepts,
    count_params,
    forward,
    hf_config,
    set_config,
    summary,
)

log = logging.getLogger(__name__)


@dataclass
class BlockLayout:
    """The residual-stream readers and writers of one decoder layer."""

    attn_norm: nn.Module
    attn_in: list[nn.Linear]
    attn_out: nn.Linear
    mlp_norm: nn.Module
    mlp_in: list[nn.Linear]
    mlp_out: nn.Linear


@dataclass
class Layout:
    embed: nn.Embedding
    blocks: list[BlockLayout]
    final_norm: nn.Module
    head: nn.Linear

    def norms(self) -> list[nn.Module]:
        return [n for b in self.blocks for n in (b.attn_norm, b.mlp_norm)] + [self.final_norm]


def _block_layout(name: str, block: nn.Module) -> BlockLayout:
    try:
        attn, mlp = block.self_attn, block.mlp
        layout = BlockLayout(
            block.input_layernorm,
            [attn.q_proj, attn.k_proj, attn.v_proj],
            attn.o_proj,
            block.post_attention_layernorm,
            [mlp.gate_proj, mlp.up_proj],
            mlp.down_proj,
        )
    except AttributeError as err:
        raise PrunekitError(
            f"{name} is not a LLaMA-style decoder layer ({err}); slicegpt supports input_layernorm -> "
            "self_attn.q/k/v/o_proj, post_attention_layernorm -> mlp.gate/up/down_proj"
        ) from None
    if not all(isinstance(m, nn.Linear) for m in layout.attn_in + layout.mlp_in + [layout.attn_out, layout.mlp_out]):
        raise PrunekitError(
            f"{name}: slicegpt needs nn.Linear projections (quantised or fused layers are not supported)"
        )
    return layout


def llama_layout(model: nn.Module) -> Layout:
    """The embedding, per-block readers/writers, final norm and head of a LLaMA-style causal LM."""
    prefix, blocks = block_list(model)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    final_norm = getattr(getattr(model, "base_model", None), "norm", None)
    if not isinstance(embed, nn.Embedding) or not isinstance(head, nn.Linear) or final_norm is None:
        raise PrunekitError(
            f"{type(model).__name__}: slicegpt needs an nn.Embedding input, a final `norm` on the base "
            "model and an nn.Linear head (a LLaMA-style causal LM)"
        )
    layout = Layout(embed, [_block_layout(f"{prefix}.{i}", b) for i, b in enumerate(blocks)], final_norm, head)
    for norm in layout.norms():
        check_rmsnorm(norm, embed.embedding_dim)
    return layout


def norm_eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(eps, float):
        raise PrunekitError(f"{type(norm).__name__} has no float `variance_epsilon` / `eps`; not a supported RMSNorm")
    return eps


@torch.no_grad()
def check_rmsnorm(norm: nn.Module, dim: int) -> None:
    """The norm must compute ``weight * x / sqrt(mean(x^2) + eps)``: folding relies on that (Gemma's
    ``(1 + weight)`` or a LayerNorm's mean subtraction would silently break the model)."""
    probe = copy.deepcopy(norm).float()  # in float32, so that bf16 rounding cannot fail the check
    x = torch.randn(3, dim, generator=torch.Generator().manual_seed(0)).to(probe.weight.device)
    expected = probe.weight * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm_eps(norm))
    if not torch.allclose(probe(x), expected, rtol=1e-4, atol=1e-5):
        raise PrunekitError(
            f"{type(norm).__name__} is not `weight * x / rms(x)`; slicegpt supports LLaMA-style RMSNorm"
        )


# ---------------------------------------------------------------- PCA of the residual stream


@torch.no_grad()
def residual_covariance(model: nn.Module, norms: Sequence[nn.Module], batches: Sequence) -> torch.Tensor:
    """``sum xhat^T xhat`` (float64, ``[d, d]``) over every norm input token, ``xhat = x / rms(x)``."""
    cov = None

    def hook(module, args):
        nonlocal cov
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm_eps(module))
        part = (x.T @ x).double()
        cov = part if cov is None else cov + part

    with hooks(n.register_forward_pre_hook(hook) for n in norms):
        for batch in batches:
            forward(model, batch)
    return cov


def principal_axes(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (decreasing) and orthonormal eigenvectors (columns) of a symmetric matrix."""
    values, vectors = torch.linalg.eigh(cov.double())
    return values.flip(0), vectors.flip(1)


# ---------------------------------------------------------------- fold, rotate, slice


def _set_weight(module: nn.Module, weight: torch.Tensor, like: torch.Tensor) -> None:
    module.weight = nn.Parameter(weight.to(like.dtype).contiguous(), requires_grad=like.requires_grad)


@torch.no_grad()
def fold_norm(norm: nn.Module, readers: Sequence[nn.Linear]) -> None:
    """``W diag(g)`` into every reader, then the norm's scale ``g`` becomes 1."""
    scale = norm.weight.double()
    for linear in readers:
        _set_weight(linear, linear.weight.double() * scale[None, :], linear.weight)
    norm.weight.fill_(1.0)


@torch.no_grad()
def rotate_readers(readers: Sequence[nn.Linear], q: torch.Tensor) -> None:
    for linear in readers:
        _set_weight(linear, linear.weight.double() @ q.to(linear.weight.device), linear.weight)
        linear.in_features = q.shape[1]


@torch.no_grad()
def rotate_writer(linear: nn.Linear, q: torch.Tensor) -> None:
    q = q.to(linear.weight.device)
    _set_weight(linear, q.T @ linear.weight.double(), linear.weight)
    if linear.bias is not None:
        linear.bias = nn.Parameter((linear.bias.double() @ q).to(linear.bias.dtype))
    linear.out_features = q.shape[1]


@torch.no_grad()
def rotate_embedding(embed: nn.Embedding, q: torch.Tensor) -> None:
    _set_weight(embed, embed.weight.double() @ q.to(embed.weight.device), embed.weight)
    embed.embedding_dim = q.shape[1]


@torch.no_grad()
def rescale_norm(norm: nn.Module, d: int, d_new: int) -> None:
    """A plain RMSNorm over ``d_new`` features that equals SliceGPT's RMSN with mean over the original ``d``."""
    weight = torch.full((d_new,), math.sqrt(d / d_new), dtype=torch.float64)
    _set_weight(norm, weight.to(norm.weight.device), norm.weight)
    norm.variance_epsilon = norm_eps(norm) * d / d_new
    if hasattr(norm, "eps"):
        norm.eps = norm.variance_epsilon


def untie_head(model: nn.Module, layout: Layout) -> None:
    """The head gets the final norm's scale folded in, so it can no longer share the embedding matrix."""
    if layout.head.weight is layout.embed.weight:
        layout.head.weight = nn.Parameter(layout.embed.weight.detach().clone())
    config = hf_config(model)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False


def fold_all(layout: Layout) -> None:
    for b in layout.blocks:
        fold_norm(b.attn_norm, b.attn_in)
        fold_norm(b.mlp_norm, b.mlp_in)
    fold_norm(layout.final_norm, [layout.head])


def rotate_all(layout: Layout, q: torch.Tensor) -> None:
    rotate_embedding(layout.embed, q)
    for b in layout.blocks:
        rotate_readers(b.attn_in, q)
        rotate_writer(b.attn_out, q)
        rotate_readers(b.mlp_in, q)
        rotate_writer(b.mlp_out, q)
    rotate_readers([layout.head], q)


def update_config(model: nn.Module, d: int, d_new: int, eps: float, head_dim: int) -> dict:
    """hidden_size and eps follow the slice; head_dim is pinned, as hidden_size / heads no longer gives it."""
    for m in model.modules():
        if isinstance(getattr(m, "hidden_size", None), int) and m.hidden_size == d:
            m.hidden_size = d_new
    values = {"hidden_size": d_new, "rms_norm_eps": eps, "head_dim": head_dim}
    set_config(model, values)
    return values


def slice_model(model: nn.Module, layout: Layout, q: torch.Tensor, head_dim: int) -> dict:
    """Fold the norms, rotate the residual stream by ``q`` ``[d, d']`` and rescale the norms for ``d'``;
    returns the config values written."""
    d, d_new = q.shape
    untie_head(model, layout)
    fold_all(layout)
    rotate_all(layout, q)
    for norm in layout.norms():
        rescale_norm(norm, d, d_new)
    return update_config(model, d, d_new, norm_eps(layout.final_norm), head_dim)


def _head_dim(model: nn.Module) -> int:
    dims = {m.head_dim for m in model.modules() if isinstance(getattr(m, "head_dim", None), int)}
    if len(dims) != 1:
        raise PrunekitError(f"cannot tell the attention head_dim (found {sorted(dims)}); slicegpt needs one value")
    return dims.pop()


def sliced_dim(d: int, ratio: float, round_to: int, accepts: Callable[[int], bool] = lambda d_new: True) -> int:
    """The width nearest ``d (1 - ratio)`` (ties: the larger) that is a multiple of ``round_to`` and that the
    config accepts (LlamaConfig wants ``hidden_size % num_attention_heads == 0``)."""
    target = d * (1.0 - ratio)
    candidates = sorted(set(range(round_to, d + 1, round_to)) | {d}, key=lambda c: (abs(c - target), -c))
    return next(c for c in candidates if accepts(c))


@register_structured
@dataclass
class SliceGPT(ModelMethod):
    """Rotate the residual stream onto its principal axes (one global rotation) and drop the weakest ones."""

    name: ClassVar[str] = "slicegpt"
    round_to: int = 1

    def __post_init__(self):
        if self.round_to < 1:
            raise PrunekitError(f"round_to must be a positive multiple, got {self.round_to}")

    def prune_model(self, model: nn.Module, batches: list, ratio: float) -> dict:
        ratio = check_ratio(ratio)
        check_batches(batches, self.name)
        layout = llama_layout(model)
        d, head_dim = layout.embed.embedding_dim, _head_dim(model)
        d_new = sliced_dim(
            d, ratio, self.round_to, lambda c: config_accepts(model, {"hidden_size": c, "head_dim": head_dim})
        )
        _, blocks = block_list(model)
        before, total_before = count_params(blocks), count_params(model)
        values, vectors = principal_axes(residual_covariance(model, layout.norms(), batches))
        config = slice_model(model, layout, vectors[:, :d_new], head_dim)
        kept = float(values[:d_new].sum() / values.sum())
        log.info("slicegpt: hidden %d -> %d, %.4f of the residual variance kept", d, d_new, kept)
        return summary(
            before,
            count_params(blocks),
            total_before,
            count_params(model),
            hidden_before=d,
            hidden_after=d_new,
            variance_kept=kept,
            config=config,
        )
