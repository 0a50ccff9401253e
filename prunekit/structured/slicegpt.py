"""SliceGPT (Ashkboos et al. 2024): rotate the residual stream onto its principal axes, with one global rotation,
and drop the weakest; for RMSNorm decoders (LLaMA, Mistral, Qwen, Gemma, Phi-3) and pre-LayerNorm ones (GPT-2, OPT,
Falcon, GPT-NeoX, GPT-J, Phi, StarCoder 2), with sequential or parallel attention and MLP. The result is a dense
model of the same class whose residual stream is narrower.

1. Fold the norms into the layers around them, so that every norm is ``x / rms(x)``, which commutes with any
   orthogonal ``Q``: ``RMSNorm(xQ) = RMSNorm(x) Q`` because ``||xQ|| = ||x||`` (computational invariance).
   RMSNorm: its scale goes into the layers that read its output (q/k/v, gate/up, lm_head ...).
   LayerNorm also subtracts the mean, which no rotation commutes with. As in SliceGPT's ``layernorm_fusion.py``,
   the mean subtraction moves into the weights that write the stream: the embeddings (position embeddings too) and
   every attention and MLP output projection, biases included, lose their mean over the hidden dimension. The
   stream then has no component along the all-ones vector ``1``, and each LayerNorm computes ``x / rms(x)`` times
   its scale, plus its shift. The scale goes into the readers as for RMSNorm; so does the shift ``b``, on the one
   direction the normalised stream never takes: a LayerNorm's output has no mean, so the readers' component along
   ``1`` is free; it becomes ``W b 1^T / d`` and the norm's shift becomes ``1``, and then
   ``W' (n(x) + 1) = W (g * n(x) + b)`` exactly, with no bias added to a layer that has none (the heads of GPT-2,
   OPT, Falcon and GPT-NeoX). Before any rotation, the folded model is the same class computing the same logits.
2. ``Q`` = eigenvectors, by decreasing eigenvalue, of ``sum x^T x`` over the inputs of every norm, each token
   first divided by its RMS (and, for LayerNorm, centred), so the PCA weighs tokens as the layers see them. For
   LayerNorm models ``Q`` maps the all-ones direction onto the all-ones direction of the narrower stream, where the
   folded shifts live and the mean subtraction keeps removing nothing, and the principal axes of the rest onto the
   others: ``d' - 1`` directions of the stream are kept.
3. Rotate the residual stream: embeddings ``E Q``, readers ``W Q``, writers (o_proj, down_proj ...) ``Q^T W`` and
   their biases ``b Q``, LayerNorm shifts ``b Q``. With all of ``Q`` this changes nothing (up to float rounding).
4. Slice to ``d'`` columns of ``Q``: every layer that reads or writes the stream loses the dropped dimensions.
   ``d'`` is the width nearest ``d (1 - s)`` that the config accepts (a multiple of ``num_attention_heads`` for
   LlamaConfig), ``s`` the fraction of the hidden width to remove: ``--sparsity`` itself with ``slicing=width``
   (SliceGPT's *slicing* in the paper's tables), or, with ``slicing=params`` (default), the fraction that removes
   ``--sparsity`` of the decoder-layer parameters. With one global ``Q`` every matrix in the blocks loses the same
   fraction of its residual side, so the two differ only by the norms' and biases' share and by rounding. SliceGPT's
   own models are larger at the same slicing: its per-block rotations put a ``d' x d'`` matrix on every residual
   connection (on kjv-llama-5m its 0.25 keeps as many parameters as prunekit's 0.125).
5. Norms over the sliced stream: SliceGPT's ``RMSN`` divides ``||x'||^2`` by the original ``d``, so that norms keep
   the scale they had when the dropped directions (small by construction) were there. A norm over ``d'`` with
   weight ``sqrt(d/d')`` and epsilon ``eps d/d'`` computes exactly that:
   ``sqrt(d/d') x' / sqrt(||x'||^2/d' + eps d/d') = x' / sqrt(||x'||^2/d + eps)`` (a LayerNorm too: the sliced
   stream has no mean). Where the config has no entry for the epsilon (OPT) or norms off the residual stream share
   it (Qwen 3's q/k norms), it stays, a difference far below the norms' own scale.

What is saved. Where the class reads the attention width from ``head_dim`` (LLaMA family, Phi, StarCoder 2) the
config takes ``hidden_size = d'``, the new epsilon and an explicit ``head_dim``: the checkpoint loads with
``from_pretrained``, no custom class, no ``trust_remote_code``. GPT-2, OPT, Falcon, GPT-NeoX, GPT-J size attention from
``hidden_size``, so no config of theirs describes a narrower stream: their config keeps ``hidden_size`` (now the
attention width) and records ``prunekit_residual_width = d'``, and the checkpoint loads with ``prunekit.load``
(``prunekit.shapes``; ``from_pretrained`` refuses it with a size mismatch). Which of the two a model gets is
found by rehearsing both on a meta copy. The folded norms stay the class's own ``LayerNorm`` / ``RMSNorm``
modules: weight ``sqrt(d/d')`` (Gemma: minus its 1), a LayerNorm's shift the rotated all-ones vector.

Why one global ``Q`` and not one per block as in SliceGPT: per-block rotations need a ``Q_l^T Q_(l+1)`` matrix on
each residual shortcut, which these classes have no place for. With one ``Q`` the shortcuts stay identities. The
cost is that one basis must serve every layer, so a slice removes somewhat more signal than SliceGPT's per-block
bases would.

Refused, with the reason, before any work: post-norms (Gemma 2/3, OLMo 2: a per-channel scale on a sublayer's
output, before the residual add; BERT, RoBERTa: the norm after the add), mixture-of-experts blocks, T5, LLaVA,
modules next to the blocks that meet the stream in ways slicegpt does not know (OPT-350m's projections); the names
it knows are in ``prunekit.architectures``. Every slice is first rehearsed on a meta copy and checked against what
its new config describes.
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

from ..architectures import (
    ATTENTION_READERS,
    ATTENTION_WRITERS,
    FINAL_NORMS,
    MLP_READERS,
    MLP_WRITERS,
    NORM_EPS_KEYS,
    PRE_NORMS,
    family,
)
from ..distributed import sum_over_ranks, together
from ..errors import PrunekitError
from ..forward import hidden_state, hooks
from ..graph import HFConv1D, input_embeddings
from ..shapes import RESIDUAL_WIDTH
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
    forward,
    hf_config,
    meta_clone,
    refusals_named,
    set_config,
    summary,
)
from .reload import ensure_reloadable

log = logging.getLogger(__name__)

SLICING = ("params", "width")


@dataclass(frozen=True)
class NormFormula:
    """How a model's norms compute: gain ``offset + weight`` (0: LLaMA and LayerNorm, 1: Gemma), and whether the
    mean is subtracted first (LayerNorm, which then adds a shift)."""

    offset: float = 0.0
    centred: bool = False


RMS_NORM, GEMMA_NORM, LAYER_NORM = NormFormula(), NormFormula(offset=1.0), NormFormula(centred=True)


@dataclass
class BlockLayout:
    """The residual-stream readers and writers of one decoder layer: each pre-norm with the layers that read its
    output (one norm read by attention and MLP alike in parallel blocks), and the output projections."""

    norms: list[tuple[nn.Module, list[nn.Module]]]
    writers: list[nn.Module]


@dataclass
class Layout:
    embeds: list[nn.Embedding]  # the token embedding, then position embeddings (GPT-2, OPT)
    blocks: list[BlockLayout]
    final_norm: nn.Module
    head: nn.Linear
    owner: nn.Module  # holds the blocks and the final norm (LlamaModel)
    formula: NormFormula

    @property
    def embed(self) -> nn.Embedding:
        return self.embeds[0]

    def readers(self) -> list[tuple[nn.Module, list[nn.Module]]]:
        """Every norm on the residual stream with the layers that read its output (the head reads the last)."""
        return [pair for b in self.blocks for pair in b.norms] + [(self.final_norm, [self.head])]

    def norms(self) -> list[nn.Module]:
        return [norm for norm, _ in self.readers()]

    def writers(self) -> list[nn.Module]:
        return [w for b in self.blocks for w in b.writers]


# ---------------------------------------------------------------- finding the layout


def _find(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _is_layer(module: nn.Module | None) -> bool:
    return isinstance(module, (nn.Linear, HFConv1D))


def _is_norm(module: nn.Module | None) -> bool:
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return isinstance(weight, torch.Tensor) and weight.dim() == 1 and isinstance(eps, float)


def _first(block: nn.Module, options: Sequence[Sequence[str]], accept: Callable) -> list[nn.Module] | None:
    """The modules of the first option whose paths all exist in ``block`` and are accepted."""
    for names in options:
        found = [_find(block, name) for name in names]
        if all(accept(m) for m in found):
            return found
    return None


def _block_layout(arch: str, name: str, block: nn.Module) -> BlockLayout:
    norms = _first(block, PRE_NORMS, _is_norm)
    attn_in, mlp_in = _first(block, ATTENTION_READERS, _is_layer), _first(block, MLP_READERS, _is_layer)
    writers = [_first(block, [(w,) for w in names], _is_layer) for names in (ATTENTION_WRITERS, MLP_WRITERS)]
    if norms is None or attn_in is None or mlp_in is None or None in writers:
        raise PrunekitError(
            f"{arch}: {name} ({type(block).__name__}) is not a pre-norm decoder layer slicegpt knows: it needs a "
            "norm in front of attention and MLP and their input and output projections under the names listed in "
            "prunekit/architectures.py (q/k/v_proj ... o_proj, c_attn ... c_proj, query_key_value ... dense)"
        )
    pairs = [(norms[0], attn_in), (norms[1], mlp_in)] if len(norms) == 2 else [(norms[0], attn_in + mlp_in)]
    return BlockLayout(pairs, [w[0] for w in writers])


def _refuse_post_norms(arch: str, block: nn.Module) -> None:
    """Post-norms scale a sublayer's output per channel before the residual add (Gemma 2/3, OLMo 2)."""
    known = {name for names in PRE_NORMS for name in names}
    post = [n for n, m in block.named_children() if _is_norm(m) and n not in known]
    if post:
        raise PrunekitError(
            f"{arch}: slicegpt cannot rotate the residual stream of {type(block).__name__}: besides its pre-norms it "
            f"has {', '.join(post)}; post-norms scale a sublayer's output per channel before the residual add, "
            "which no rotation commutes with"
        )


def _refuse_other_writers(arch: str, owner: nn.Module, known: Sequence[nn.Module]) -> None:
    """Everything next to the blocks that has weights must be an embedding or the final norm: a projection there
    (OPT-350m's project_in / project_out) meets the stream in a way slicegpt does not rotate."""
    ours = {id(p) for module in known for p in module.parameters()}
    others = sorted({name.rpartition(".")[0] for name, p in owner.named_parameters() if id(p) not in ours})
    if others:
        raise PrunekitError(
            f"{arch}: slicegpt does not know how {', '.join(others)} meets the residual stream; it rotates the "
            "embeddings, the decoder layers and the final norm"
        )


def _refuse_outside_writers(arch: str, model: nn.Module, owner_name: str, head: nn.Module) -> None:
    """Weights outside the text model and its head (a vision-language model's vision tower and projector) write
    into the residual stream where slicegpt cannot follow: image features take the place of token embeddings."""
    owner = model.get_submodule(owner_name)
    inside = {id(p) for module in (owner, head) for p in module.parameters()}
    depth = len(owner_name.split(".")) if owner_name else 1
    others = sorted({".".join(name.split(".")[:depth]) for name, p in model.named_parameters() if id(p) not in inside})
    if others:
        raise PrunekitError(
            f"{arch}: slicegpt rotates the residual stream of {owner_name or 'the model'}, but {', '.join(others[:3])} "
            "also feed it (image features in place of tokens), which it cannot rotate; use depth, width or an "
            "unstructured method"
        )


def find_layout(model: nn.Module, formula: NormFormula | None = None) -> Layout:
    """The embeddings, per-block readers/writers, final norm and head of a pre-norm causal LM. The norms' formula is
    checked numerically unless it is given (a meta copy has no numbers to check)."""
    prefix, blocks = block_list(model)
    arch, owner = arch_name(model), model.get_submodule(prefix.rpartition(".")[0])
    check_resizable(model, prefix, blocks, "slicegpt")
    if family(arch).no_slicegpt:
        raise PrunekitError(f"{arch}: slicegpt cannot slice the residual stream: {family(arch).no_slicegpt}")
    _refuse_post_norms(arch, blocks[0])
    layers = [_block_layout(arch, f"{prefix}.{i}", b) for i, b in enumerate(blocks)]
    embed, head = input_embeddings(model), model.get_output_embeddings()
    final_norm = next((m for m in (_find(owner, n) for n in FINAL_NORMS) if _is_norm(m)), None)
    if not isinstance(embed, nn.Embedding) or not isinstance(head, nn.Linear) or final_norm is None:
        raise PrunekitError(
            f"{arch}: slicegpt needs an nn.Embedding input, a final norm next to the blocks "
            f"({', '.join(FINAL_NORMS)}) and an nn.Linear head (a pre-norm causal LM)"
        )
    _refuse_outside_writers(arch, model, prefix.rpartition(".")[0], head)
    width = final_norm.weight.numel()
    positions = [m for m in owner.children() if isinstance(m, nn.Embedding) and m is not embed and d_of(m) == width]
    _refuse_other_writers(arch, owner, [blocks, embed, *positions, final_norm])
    if d_of(embed) != width:
        raise PrunekitError(f"{arch}: slicegpt needs embeddings as wide as the residual stream ({width})")
    layout = Layout([embed, *positions], layers, final_norm, head, owner, formula or RMS_NORM)
    if formula is None:
        layout.formula = model_norm_formula(arch, layout.norms())
    return layout


def d_of(embed: nn.Embedding) -> int:
    return embed.weight.shape[1]


class _Seen(Exception):
    """Stops a forward pass once the hooks have what they need."""


@torch.no_grad()
def check_pre_norm(model: nn.Module, layout: Layout, batch) -> None:
    """Refuse post-norm blocks whose norms carry pre-norm names (OPT with ``do_layer_norm_before=False``): a
    pre-norm reads the block's own input, a post-norm the input plus a sublayer's output. Checked on the first block
    with one calibration batch, stopping there; nothing is changed."""
    seen: dict[str, torch.Tensor] = {}
    norm = layout.blocks[0].norms[0][0]

    def block_input(module, args, kwargs):
        seen["block"] = hidden_state(args, kwargs)

    def norm_input(module, args):
        seen["norm"] = args[0]
        raise _Seen

    block = block_list(model)[1][0]
    watch = block.register_forward_pre_hook(block_input, with_kwargs=True)
    with hooks([watch, norm.register_forward_pre_hook(norm_input)]):
        try:
            forward(model, batch)
        except _Seen:
            pass
    if "block" not in seen or "norm" not in seen or not torch.equal(seen["block"], seen["norm"]):
        raise PrunekitError(
            f"{arch_name(model)}: slicegpt needs pre-norm blocks, but the first norm of {type(block).__name__} "
            "does not read the block's input (a post-norm, LayerNorm(x + sublayer(x)), scales the residual stream "
            "itself per channel, which no rotation commutes with)"
        )


def norm_eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(eps, float):
        raise PrunekitError(f"{type(norm).__name__} has no float `variance_epsilon` / `eps`; not a supported norm")
    return eps


@torch.no_grad()
def norm_formula(norm: nn.Module, what: str) -> NormFormula:
    """Which formula the norm computes, found by running it: ``weight * x / rms(x)`` (LLaMA), ``(1 + weight) *
    x / rms(x)`` (Gemma) or a LayerNorm ``weight * (x - mean) / std + bias``; folding relies on it."""
    probe = copy.deepcopy(norm).float()  # in float32, so that bf16 rounding cannot fail the check
    gen = torch.Generator().manual_seed(0)
    probe.weight.copy_(torch.rand(probe.weight.shape, generator=gen) + 0.5)
    shift = getattr(probe, "bias", None)
    if isinstance(shift, torch.Tensor):
        shift.copy_(torch.randn(shift.shape, generator=gen))
    x = torch.randn(3, probe.weight.numel(), generator=gen).to(probe.weight.device)
    eps = norm_eps(norm)
    scaled = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    centred = x - x.mean(-1, keepdim=True)
    centred = centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
    candidates = {
        RMS_NORM: probe.weight * scaled,
        GEMMA_NORM: (1 + probe.weight) * scaled,
        LAYER_NORM: probe.weight * centred + (shift if isinstance(shift, torch.Tensor) else 0.0),
    }
    output = probe(x)
    for formula, expected in candidates.items():
        if torch.allclose(output, expected, rtol=1e-4, atol=1e-5):
            return formula
    raise PrunekitError(
        f"{what} is neither an RMSNorm (weight * x / rms(x), or Gemma's (1 + weight)) nor a LayerNorm; slicegpt "
        "folds norms into the layers around them by their formula"
    )


def model_norm_formula(arch: str, norms: Sequence[nn.Module]) -> NormFormula:
    """The one formula of all the residual norms (a model mixing them is refused)."""
    found = {norm_formula(m, f"{arch}: {type(m).__name__}") for m in norms}
    if len(found) > 1:
        raise PrunekitError(f"{arch}: slicegpt needs one norm formula; this model mixes weight and (1 + weight)")
    return found.pop()


# ---------------------------------------------------------------- PCA of the residual stream


@torch.no_grad()
def residual_covariance(
    model: nn.Module, norms: Sequence[nn.Module], batches: Sequence, centred: bool = False
) -> torch.Tensor:
    """``sum xhat^T xhat`` (float64, ``[d, d]``) over every norm input token, ``xhat = x / rms(x)`` (``x`` less its
    mean first where ``centred``: what the stream is once the mean subtraction is folded)."""
    cov = None

    def hook(module, args):
        nonlocal cov
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        if centred:
            x = x - x.mean(-1, keepdim=True)
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


def ones_reflection(d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A symmetric orthogonal ``[d, d]`` matrix whose first column is the unit all-ones vector (the Householder
    reflection that swaps it with the first axis); its other columns span the zero-mean vectors."""
    v = torch.full((d,), d**-0.5, dtype=torch.float64, device=device)
    v[0] -= 1.0
    if d == 1:
        return torch.ones(1, 1, dtype=torch.float64, device=device)
    return torch.eye(d, dtype=torch.float64, device=device) - 2.0 * torch.outer(v, v) / v.dot(v)


def rotation(cov: torch.Tensor, d_new: int, formula: NormFormula) -> tuple[torch.Tensor, float]:
    """``Q`` ``[d, d']`` and the fraction of the residual variance it keeps. For a LayerNorm model the first
    reflection takes the all-ones direction out, the PCA orders the zero-mean rest, the second puts the all-ones
    direction back as the all-ones direction of the narrower stream."""
    if not formula.centred:
        values, vectors = principal_axes(cov)
        return vectors[:, :d_new], float(values[:d_new].sum() / values.sum())
    d = cov.shape[0]
    reflect = ones_reflection(d, cov.device)
    values, vectors = principal_axes((reflect @ cov.double() @ reflect)[1:, 1:])
    turn = torch.zeros(d, d_new, dtype=torch.float64, device=cov.device)
    turn[0, 0] = 1.0
    turn[1:, 1:] = vectors[:, : d_new - 1]
    q = reflect @ turn @ ones_reflection(d_new, cov.device)
    return q, float(values[: d_new - 1].sum() / values.sum())


# ---------------------------------------------------------------- fold, rotate, slice


def _set_weight(module: nn.Module, weight: torch.Tensor, like: torch.Tensor) -> None:
    module.weight = nn.Parameter(weight.to(like.dtype).contiguous(), requires_grad=like.requires_grad)


def _set_bias(module: nn.Module, bias: torch.Tensor) -> None:
    old = module.bias
    module.bias = nn.Parameter(bias.to(old.dtype).contiguous(), requires_grad=old.requires_grad)


def matrix(layer: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` in float64 (HF ``Conv1D`` stores it transposed)."""
    weight = layer.weight.double()
    return weight.T if isinstance(layer, HFConv1D) else weight


def set_matrix(layer: nn.Module, weight: torch.Tensor) -> None:
    """Store an ``[out, in]`` weight and the sizes that go with it."""
    conv1d = isinstance(layer, HFConv1D)
    _set_weight(layer, weight.T if conv1d else weight, layer.weight)
    out_features, in_features = weight.shape
    if conv1d:
        layer.nf, layer.nx = out_features, in_features
    else:
        layer.out_features, layer.in_features = out_features, in_features


def _shift(norm: nn.Module) -> torch.Tensor | None:
    bias = getattr(norm, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


@torch.no_grad()
def centre_stream(layout: Layout) -> None:
    """Subtract from every weight that writes the residual stream its mean over the hidden dimension: embedding rows,
    output projection columns and biases. LayerNorms remove that mean anyway, so nothing changes; afterwards the
    stream has no component along the all-ones vector."""
    for embed in layout.embeds:
        weight = embed.weight.double()
        _set_weight(embed, weight - weight.mean(1, keepdim=True), embed.weight)
    for layer in layout.writers():
        weight = matrix(layer)
        set_matrix(layer, weight - weight.mean(0, keepdim=True))
        if layer.bias is not None:
            _set_bias(layer, layer.bias.double() - layer.bias.double().mean())


@torch.no_grad()
def fold_norm(norm: nn.Module, readers: Sequence[nn.Module], formula: NormFormula) -> None:
    """``W diag(g)`` into every reader, ``g = offset + weight`` the norm's gain, which then becomes 1. A LayerNorm's
    output has no mean, so the readers' component along the all-ones vector is free: it carries the shift ``W b``
    (``W b 1^T / d`` on a shift of ones) instead."""
    gain, shift = formula.offset + norm.weight.double(), _shift(norm)
    for layer in readers:
        weight = matrix(layer)
        folded = weight * gain[None, :]
        if formula.centred:
            folded = folded - folded.mean(1, keepdim=True)
            if shift is not None:
                folded = folded + (weight @ shift.double())[:, None] / gain.numel()
        set_matrix(layer, folded)
    norm.weight.fill_(1.0 - formula.offset)
    if formula.centred and shift is not None:
        shift.fill_(1.0)


@torch.no_grad()
def rotate_readers(readers: Sequence[nn.Module], q: torch.Tensor) -> None:
    for layer in readers:
        set_matrix(layer, matrix(layer) @ q.to(layer.weight.device))


@torch.no_grad()
def rotate_writer(layer: nn.Module, q: torch.Tensor) -> None:
    q = q.to(layer.weight.device)
    set_matrix(layer, q.T @ matrix(layer))
    if layer.bias is not None:
        _set_bias(layer, layer.bias.double() @ q)


@torch.no_grad()
def rotate_shift(norm: nn.Module, q: torch.Tensor) -> None:
    """A LayerNorm's shift is a vector in the stream's basis (ones after folding): ``b Q``."""
    if _shift(norm) is not None:
        _set_bias(norm, norm.bias.double() @ q.to(norm.bias.device))


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
    """A norm over ``d_new`` features that equals SliceGPT's RMSN with mean over the original ``d``
    (``eps_scale`` defaults to ``d / d_new``; 1 keeps eps, see ``eps_entry``)."""
    weight = torch.full((d_new,), math.sqrt(d / d_new) - offset, dtype=torch.float64)
    _set_weight(norm, weight.to(norm.weight.device), norm.weight)
    if hasattr(norm, "normalized_shape"):  # nn.LayerNorm
        norm.normalized_shape = (d_new,)
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
    if layout.formula.centred:
        centre_stream(layout)
    for norm, readers in layout.readers():
        fold_norm(norm, readers, layout.formula)


def rotate_all(layout: Layout, q: torch.Tensor) -> None:
    for embed in layout.embeds:
        rotate_embedding(embed, q)
    for norm, readers in layout.readers():
        rotate_readers(readers, q)
        rotate_shift(norm, q)
    for writer in layout.writers():
        rotate_writer(writer, q)


def shared_eps(layout: Layout) -> bool:
    """Whether norms off the residual stream (Qwen 3's per-head q/k norms) read the same config epsilon: then
    it must stay, and the sliced norms divide by ``||x'||^2/d + eps d'/d`` instead of SliceGPT's
    ``||x'||^2/d + eps``, a difference far below the norms' own scale."""
    residual = {id(n) for n in layout.norms()}
    return any(_is_norm(m) and id(m) not in residual for m in layout.owner.modules())


def eps_entry(layout: Layout, config) -> str | None:
    """The config entry holding the residual norms' epsilon, which follows the slice; None where there is none
    (OPT's LayerNorms take torch's default) or norms off the stream share it (``shared_eps``): eps then stays."""
    eps = norm_eps(layout.final_norm)
    key = next((k for k in NORM_EPS_KEYS if getattr(config, k, None) == eps), None)
    return None if key is None or shared_eps(layout) else key


def slice_model(model: nn.Module, layout: Layout, q: torch.Tensor, head_dim: int | None) -> dict:
    """Fold the norms, rotate the residual stream by ``q`` ``[d, d']`` and rescale the norms for ``d'``; returns the
    config values written. With ``head_dim`` the config takes ``hidden_size = d'`` (the class describes the slice);
    without, it keeps ``hidden_size`` and records the residual width (``prunekit.shapes``)."""
    d, d_new = q.shape
    config = block_config(model, block_list(model)[0])
    key = eps_entry(layout, config)
    untie_head(model, layout, config)
    fold_all(layout)
    rotate_all(layout, q)
    for norm in layout.norms():
        rescale_norm(norm, d, d_new, layout.formula.offset, None if key else 1.0)
    values = {key: norm_eps(layout.final_norm)} if key else {}
    if head_dim is None:
        values[RESIDUAL_WIDTH] = d_new
    else:
        values.update(hidden_size=d_new, head_dim=head_dim)
        for m in layout.owner.modules():
            if isinstance(getattr(m, "hidden_size", None), int) and m.hidden_size == d:
                m.hidden_size = d_new
    set_config(config, values)
    return values


def rehearse(model: nn.Module, layout: Layout, d_new: int, head_dim: int | None) -> None:
    """Slice a meta copy of the model the same way and check it is what its new config describes."""
    clone = meta_clone(model)
    q = torch.empty(d_of(layout.embed), d_new, device="meta")
    slice_model(clone, find_layout(clone, layout.formula), q, head_dim)
    ensure_reloadable(clone, "slicegpt")


def _head_dim(layout: Layout) -> int | None:
    """The attention head width, where the modules state one (``head_dim``); None otherwise (GPT-NeoX)."""
    dims = {m.head_dim for m in layout.owner.modules() if isinstance(getattr(m, "head_dim", None), int)}
    return dims.pop() if len(dims) == 1 else None


def sliced_dim(d: int, ratio: float, round_to: int, accepts: Callable[[int], bool] = lambda d_new: True) -> int | None:
    """The width nearest ``d (1 - ratio)`` (ties: the larger) that is a multiple of ``round_to`` and that the
    config accepts (LlamaConfig wants ``hidden_size % num_attention_heads == 0``); None if it accepts none."""
    target = d * (1.0 - ratio)
    candidates = sorted(set(range(round_to, d + 1, round_to)) | {d}, key=lambda c: (abs(c - target), -c))
    return next((c for c in candidates if accepts(c)), None)


def width_per_params(layout: Layout, blocks: nn.Module, ratio: float) -> float:
    """The fraction of the hidden width whose removal removes ``ratio`` of the decoder-layer parameters. With one
    global rotation every matrix loses its residual side: per dimension of the stream, each reader one input column
    (as many weights as it has rows), each writer one output row and its bias entry, each norm its weight and shift
    entries; the readers' biases and anything else in the blocks stay."""
    d = d_of(layout.embed)
    per_unit = sum(matrix_rows(layer) for b in layout.blocks for _, readers in b.norms for layer in readers)
    per_unit += sum(matrix_cols(layer) + (layer.bias is not None) for layer in layout.writers())
    per_unit += sum(p.numel() for b in layout.blocks for norm, _ in b.norms for p in norm.parameters()) / d
    fraction = ratio * count_params(blocks) / (per_unit * d)
    if fraction >= 1.0:
        raise PrunekitError(
            f"removing {ratio:.0%} of the decoder-layer parameters would take the whole residual stream "
            f"({fraction:.0%} of its width); use a smaller sparsity"
        )
    return fraction


def matrix_rows(layer: nn.Module) -> int:
    return layer.weight.shape[1 if isinstance(layer, HFConv1D) else 0]


def matrix_cols(layer: nn.Module) -> int:
    return layer.weight.shape[0 if isinstance(layer, HFConv1D) else 1]


def _reloads(model: nn.Module, layout: Layout, d_new: int, head_dim: int) -> bool:
    try:
        rehearse(model, layout, d_new, head_dim)
    except PrunekitError as err:
        log.info("slicegpt: a smaller hidden_size cannot describe the slice (%s); recording the residual width", err)
        return False
    return True


@register_structured
@dataclass
class SliceGPT(ModelMethod):
    """Rotate the residual stream onto its principal axes (one global rotation) and drop the weakest ones.

    ``slicing``: what ``--sparsity`` is a fraction of: ``params``, the decoder-layer parameters (default), or
    ``width``, the hidden width (SliceGPT's slicing, as in the paper's tables). ``round_to``: the new width is a
    multiple of it."""

    name: ClassVar[str] = "slicegpt"
    round_to: int = 1
    slicing: str = "params"

    def __post_init__(self):
        if self.round_to < 1:
            raise PrunekitError(f"round_to must be a positive multiple, got {self.round_to}")
        if self.slicing not in SLICING:
            raise PrunekitError(
                f"slicing must be 'params' (--sparsity = fraction of the decoder-layer parameters) or 'width' "
                f"(fraction of the hidden width, SliceGPT's slicing), got {self.slicing!r}"
            )

    def plan(self, model: nn.Module, layout: Layout, ratio: float) -> tuple[int, int | None]:
        """The new width and, where a smaller ``hidden_size`` describes it, the head_dim to pin (else None), both
        rehearsed on a meta copy."""
        prefix, blocks = block_list(model)
        d, head_dim, hf = d_of(layout.embed), _head_dim(layout), block_config(model, prefix)
        width = ratio if self.slicing == "width" else width_per_params(layout, blocks, ratio)
        if head_dim is not None:

            def accepts(c: int) -> bool:
                return config_accepts(hf, {"hidden_size": c, "head_dim": head_dim})

            d_new = sliced_dim(d, width, self.round_to, accepts)
            if d_new is not None and _reloads(model, layout, d_new, head_dim):
                return d_new, head_dim
        d_new = sliced_dim(d, width, self.round_to)
        rehearse(model, layout, d_new, None)
        return d_new, None

    def prune_model(self, model: nn.Module, batches: list, ratio: float) -> dict:
        ratio = check_ratio(ratio)
        check_batches(batches, self.name)
        with refusals_named(model):
            layout = find_layout(model)
        check_pre_norm(model, layout, batches[0])
        d_new, head_dim = self.plan(model, layout, ratio)
        blocks = block_list(model)[1]
        before, total_before, d = count_params(blocks), count_params(model), d_of(layout.embed)
        cov = residual_covariance(model, layout.norms(), batches, layout.formula.centred)
        q, kept = rotation(cov, d_new, layout.formula)
        config = slice_model(model, layout, q, head_dim)
        log.info("slicegpt: hidden %d -> %d, %.4f of the residual variance kept", d, d_new, kept)
        return summary(
            before,
            count_params(blocks),
            total_before,
            count_params(model),
            hidden_before=d,
            hidden_after=d_new,
            variance_kept=kept,
            slicing=self.slicing,
            norm="LayerNorm" if layout.formula.centred else "RMSNorm",
            loads_with="from_pretrained" if head_dim is not None else "prunekit.load",
            config=config,
        )
