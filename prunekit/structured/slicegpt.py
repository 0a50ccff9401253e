"""SliceGPT-style slicing of the residual stream, with one global rotation, saved as a plain model of the same
class (``LlamaForCausalLM`` ...) whose ``hidden_size`` is smaller.

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
   checkpoint loads with ``from_pretrained``: no custom class, no ``trust_remote_code``. (Where per-head q/k norms
   share that epsilon, Qwen 3, it stays as it is: see ``shared_eps``.)

Why one global ``Q`` and not one per block as in SliceGPT: per-block rotations need a ``Q_l^T Q_(l+1)`` matrix
on each residual shortcut, which a ``LlamaForCausalLM`` has no place for. With one ``Q`` the shortcuts stay
identities. The cost is that one basis must serve every layer, so a slice removes somewhat more signal than
SliceGPT's per-block bases would.

Supported: LLaMA-style decoders (``input_layernorm`` -> ``self_attn.{q,k,v}_proj`` or Phi-3's fused ``qkv_proj``
... ``o_proj``, ``post_attention_layernorm`` -> ``mlp.{gate,up}_proj`` or ``gate_up_proj`` ... ``down_proj``, final
``norm``, ``lm_head``) with RMSNorms ``weight * x / rms(x)`` (LLaMA, Mistral, Qwen 2/3, Phi-3) or ``(1 + weight) *
x / rms(x)`` (Gemma, whose embeddings are also scaled by ``sqrt(hidden_size)``: the rows are rescaled so the smaller
scale gives the same stream); the norm formula is checked numerically. Refused, with the reason, before any work:
LayerNorm models (the mean subtraction does not commute with a rotation), post-norms (Gemma 2/3, OLMo 2: a
per-channel scale on a sublayer's output, before the residual add), mixture-of-experts blocks, T5, LLaVA (see
``prunekit.architectures``). Every slice is first rehearsed on a meta copy and checked against what its new config
describes.
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

from ..architectures import ATTENTION_READERS, MLP_READERS, PRE_NORMS, family
from ..distributed import sum_over_ranks, together
from ..errors import PrunekitError
from ..forward import hooks
from ..graph import input_embeddings
from .base import ModelMethod, register_structured
from .common import (
    arch_name,
    block_config,
    block_list,
    check_batches,
    check_ratio,
    check_resizable,
    config_accepts,
    count_params,
    ensure_reloadable,
    forward,
    hf_config,
    meta_clone,
    refusals_named,
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
    owner: nn.Module  # holds the blocks and the final norm (LlamaModel)
    offset: float  # RMSNorm gain is offset + weight: 0 (LLaMA), 1 (Gemma)

    def norms(self) -> list[nn.Module]:
        return [n for b in self.blocks for n in (b.attn_norm, b.mlp_norm)] + [self.final_norm]


def _readers(module: nn.Module, layouts: tuple[tuple[str, ...], ...]) -> list[nn.Linear] | None:
    for names in layouts:
        found = [getattr(module, n, None) for n in names]
        if all(isinstance(m, nn.Linear) for m in found):
            return found
    return None


def _block_layout(name: str, block: nn.Module) -> BlockLayout:
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    attn_in, mlp_in = _readers(attn, ATTENTION_READERS), _readers(mlp, MLP_READERS)
    norms = [getattr(block, n, None) for n in PRE_NORMS]
    writers = [getattr(attn, "o_proj", None), getattr(mlp, "down_proj", None)]
    if attn_in is None or mlp_in is None or None in norms or not all(isinstance(w, nn.Linear) for w in writers):
        raise PrunekitError(
            f"{name} is not a LLaMA-style decoder layer; slicegpt supports input_layernorm -> self_attn.q/k/v_proj "
            "(or qkv_proj) ... o_proj, post_attention_layernorm -> mlp.gate/up_proj (or gate_up_proj) ... down_proj"
        )
    return BlockLayout(norms[0], attn_in, writers[0], norms[1], mlp_in, writers[1])


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return isinstance(weight, torch.Tensor) and weight.dim() == 1 and isinstance(eps, float)


def check_norms(model: nn.Module, norms: Sequence[nn.Module], blocks: nn.Module) -> float:
    """Refuse, with the reason, norms that cannot be folded into a rotation: a LayerNorm (its mean subtraction
    does not commute with a rotation) or post-norms, which scale a sublayer's output per channel before the
    residual add (Gemma 2/3, OLMo 2). Returns the RMSNorm gain offset, one for all: 0, or 1 for Gemma."""
    arch = arch_name(model)
    offsets = {rmsnorm_offset(m, f"{arch}: {type(m).__name__}") for m in norms}
    post = [n for n, m in blocks[0].named_children() if _is_norm(m) and n not in PRE_NORMS]
    if post:
        raise PrunekitError(
            f"{arch}: slicegpt cannot rotate the residual stream of {type(blocks[0]).__name__}: besides its two "
            f"pre-norms it has {', '.join(post)}; post-norms scale a sublayer's output per channel before the "
            "residual add, which no rotation commutes with"
        )
    if len(offsets) > 1:
        raise PrunekitError(f"{arch}: slicegpt needs one RMSNorm formula; this model mixes weight and (1 + weight)")
    return offsets.pop()


def find_layout(model: nn.Module, offset: float | None = None) -> Layout:
    """The embedding, per-block readers/writers, final norm and head of a LLaMA-style causal LM. The norms are
    checked numerically unless their gain ``offset`` is given (a meta copy has no numbers to check)."""
    prefix, blocks = block_list(model)
    arch, owner = arch_name(model), model.get_submodule(prefix.rpartition(".")[0])
    check_resizable(model, prefix, blocks, "slicegpt")
    if family(arch).no_slicegpt:
        raise PrunekitError(f"{arch}: slicegpt cannot slice the residual stream: {family(arch).no_slicegpt}")
    embed, head, final_norm = input_embeddings(model), model.get_output_embeddings(), getattr(owner, "norm", None)
    if offset is None:
        norms = [m for m in blocks.modules() if _is_norm(m)] + ([final_norm] if _is_norm(final_norm) else [])
        offset = check_norms(model, norms, blocks)
    if not isinstance(embed, nn.Embedding) or not isinstance(head, nn.Linear) or final_norm is None:
        raise PrunekitError(
            f"{arch}: slicegpt needs an nn.Embedding input, a final `norm` next to the blocks and an "
            "nn.Linear head (a LLaMA-style causal LM)"
        )
    layers = [_block_layout(f"{prefix}.{i}", b) for i, b in enumerate(blocks)]
    return Layout(embed, layers, final_norm, head, owner, offset)


def norm_eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(eps, float):
        raise PrunekitError(f"{type(norm).__name__} has no float `variance_epsilon` / `eps`; not a supported RMSNorm")
    return eps


@torch.no_grad()
def rmsnorm_offset(norm: nn.Module, what: str) -> float:
    """0 if the norm computes ``weight * x / sqrt(mean(x^2) + eps)`` (LLaMA), 1 if ``(1 + weight) * ...``
    (Gemma); folding relies on the formula, so anything else (a LayerNorm's mean subtraction) is refused."""
    probe = copy.deepcopy(norm).float()  # in float32, so that bf16 rounding cannot fail the check
    gen = torch.Generator().manual_seed(0)
    probe.weight.copy_(torch.rand(probe.weight.shape, generator=gen) + 0.5)
    x = torch.randn(3, probe.weight.numel(), generator=gen).to(probe.weight.device)
    normalised = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm_eps(norm))
    for offset in (0.0, 1.0):
        if torch.allclose(probe(x), (offset + probe.weight) * normalised, rtol=1e-4, atol=1e-5):
            return offset
    raise PrunekitError(
        f"{what} is not an RMSNorm (weight * x / rms(x), or Gemma's (1 + weight)); slicegpt folds norms into a "
        "rotation, which a LayerNorm's mean subtraction does not commute with"
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

    with together(), hooks(n.register_forward_pre_hook(hook) for n in norms):
        for batch in batches:
            forward(model, batch)
    sum_over_ranks(cov)
    return cov


def principal_axes(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (decreasing) and orthonormal eigenvectors (columns) of a symmetric matrix."""
    values, vectors = torch.linalg.eigh(cov.double())
    return values.flip(0), vectors.flip(1)


# ---------------------------------------------------------------- fold, rotate, slice


def _set_weight(module: nn.Module, weight: torch.Tensor, like: torch.Tensor) -> None:
    module.weight = nn.Parameter(weight.to(like.dtype).contiguous(), requires_grad=like.requires_grad)


@torch.no_grad()
def fold_norm(norm: nn.Module, readers: Sequence[nn.Linear], offset: float) -> None:
    """``W diag(g)`` into every reader, ``g = offset + weight`` the norm's gain, which then becomes 1."""
    scale = offset + norm.weight.double()
    for linear in readers:
        _set_weight(linear, linear.weight.double() * scale[None, :], linear.weight)
    norm.weight.fill_(1.0 - offset)


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


def embedding_scale(embed: nn.Module, d: int, d_new: int) -> tuple[float, float]:
    """The embedding's output scale before and after slicing. Gemma multiplies embeddings by
    ``sqrt(hidden_size)``, which a smaller ``hidden_size`` changes; LLaMA's scale is 1 either way."""
    scale = getattr(embed, "scalar_embed_scale", 1.0)
    if math.isclose(scale, 1.0):
        return 1.0, 1.0
    if math.isclose(scale, math.sqrt(d), rel_tol=1e-6):
        return scale, math.sqrt(d_new)
    raise PrunekitError(f"embedding scale {scale} is neither 1 nor sqrt(hidden_size); slicegpt cannot rescale it")


@torch.no_grad()
def rotate_embedding(embed: nn.Embedding, q: torch.Tensor) -> None:
    """``E Q``, with the rows rescaled so that the model's new embedding scale gives the old outputs."""
    old, new = embedding_scale(embed, q.shape[0], q.shape[1])
    _set_weight(embed, embed.weight.double() @ q.to(embed.weight.device) * (old / new), embed.weight)
    embed.embedding_dim = q.shape[1]
    if old != new:
        embed.scalar_embed_scale = new
        embed.embed_scale = torch.tensor(new, device=embed.embed_scale.device)


@torch.no_grad()
def rescale_norm(norm: nn.Module, d: int, d_new: int, offset: float = 0.0, eps_scale: float | None = None) -> None:
    """A plain RMSNorm over ``d_new`` features that equals SliceGPT's RMSN with mean over the original ``d``
    (``eps_scale`` defaults to ``d / d_new``; 1 keeps eps, see ``shared_eps``)."""
    weight = torch.full((d_new,), math.sqrt(d / d_new) - offset, dtype=torch.float64)
    _set_weight(norm, weight.to(norm.weight.device), norm.weight)
    eps = norm_eps(norm) * (d / d_new if eps_scale is None else eps_scale)
    for key in ("variance_epsilon", "eps"):
        if hasattr(norm, key):
            setattr(norm, key, eps)


def untie_head(model: nn.Module, layout: Layout, config) -> None:
    """The head gets the final norm's scale folded in, so it can no longer share the embedding matrix."""
    if layout.head.weight is layout.embed.weight:
        layout.head.weight = nn.Parameter(layout.embed.weight.detach().clone())
    for c in (hf_config(model), config):
        if c is not None and getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False


def fold_all(layout: Layout) -> None:
    for b in layout.blocks:
        fold_norm(b.attn_norm, b.attn_in, layout.offset)
        fold_norm(b.mlp_norm, b.mlp_in, layout.offset)
    fold_norm(layout.final_norm, [layout.head], layout.offset)


def rotate_all(layout: Layout, q: torch.Tensor) -> None:
    rotate_embedding(layout.embed, q)
    for b in layout.blocks:
        rotate_readers(b.attn_in, q)
        rotate_writer(b.attn_out, q)
        rotate_readers(b.mlp_in, q)
        rotate_writer(b.mlp_out, q)
    rotate_readers([layout.head], q)


def update_config(layout: Layout, config, d: int, d_new: int, eps: float, head_dim: int) -> dict:
    """hidden_size and eps follow the slice; head_dim is pinned, as hidden_size / heads no longer gives it."""
    for m in layout.owner.modules():
        if isinstance(getattr(m, "hidden_size", None), int) and m.hidden_size == d:
            m.hidden_size = d_new
    values = {"hidden_size": d_new, "rms_norm_eps": eps, "head_dim": head_dim}
    set_config(config, values)
    return values


def shared_eps(layout: Layout) -> bool:
    """Whether norms off the residual stream (Qwen 3's per-head q/k norms) read the same config epsilon: then
    it must stay, and the sliced norms divide by ``||x'||^2/d + eps d'/d`` instead of SliceGPT's
    ``||x'||^2/d + eps``, a difference far below the norms' own scale."""
    residual = {id(n) for n in layout.norms()}
    return any(_is_norm(m) and id(m) not in residual for m in layout.owner.modules())


def slice_model(model: nn.Module, layout: Layout, q: torch.Tensor, head_dim: int) -> dict:
    """Fold the norms, rotate the residual stream by ``q`` ``[d, d']`` and rescale the norms for ``d'``;
    returns the config values written."""
    d, d_new = q.shape
    config = block_config(model, block_list(model)[0])
    eps_scale = 1.0 if shared_eps(layout) else None
    untie_head(model, layout, config)
    fold_all(layout)
    rotate_all(layout, q)
    for norm in layout.norms():
        rescale_norm(norm, d, d_new, layout.offset, eps_scale)
    return update_config(layout, config, d, d_new, norm_eps(layout.final_norm), head_dim)


def rehearse(model: nn.Module, layout: Layout, d_new: int, head_dim: int) -> None:
    """Slice a meta copy of the model the same way and check it is what its new config describes."""
    clone = meta_clone(model)
    q = torch.empty(layout.embed.embedding_dim, d_new, device="meta")
    slice_model(clone, find_layout(clone, layout.offset), q, head_dim)
    ensure_reloadable(clone, "slicegpt")


def _head_dim(layout: Layout) -> int:
    dims = {m.head_dim for m in layout.owner.modules() if isinstance(getattr(m, "head_dim", None), int)}
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
        with refusals_named(model):
            layout = find_layout(model)
        prefix, blocks = block_list(model)
        d, head_dim, hf = layout.embed.embedding_dim, _head_dim(layout), block_config(model, prefix)
        d_new = sliced_dim(
            d, ratio, self.round_to, lambda c: config_accepts(hf, {"hidden_size": c, "head_dim": head_dim})
        )
        rehearse(model, layout, d_new, head_dim)
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
