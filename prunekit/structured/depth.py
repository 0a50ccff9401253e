"""Depth pruning: remove the least important whole blocks (decoder layers, ViT blocks).

Importance of block ``i``, lower = removed first:

* ``cosine`` (ShortGPT's Block Influence): ``1 - mean cos(x_in, x_out)`` over calibration tokens; a block that
  barely turns the residual stream does little. One forward pass.
* ``ppl``: the increase of the mean next-token NLL on the calibration batches when block ``i`` alone is skipped.
  One forward pass per block (causal LMs only).
* ``taylor`` (Shortened LLaMA's Taylor criterion, Kim et al. 2024): the loss change a first-order Taylor
  expansion predicts when the block's weights are removed, ``sum |w * g|`` over every weight of the block (its
  matrices and norm scales, as their code sums every parameter named ``weight``), ``g`` the gradient of the
  model's own loss averaged over the calibration windows (``gradients``). One forward and backward pass per
  window; memory: 4 bytes per block weight for the gradient sum and one window's activations (one block's with
  ``checkpointing``, the default).

``keep_first`` / ``keep_last`` keep the first / last blocks whatever their score: Shortened LLaMA's "+" heuristic
(``Taylor+`` = ``score=taylor, keep_first=4, keep_last=2`` on 32-block LLaMA-7B; their code applies it to every
criterion), since the Taylor criterion tends to pick the first blocks, which matter most.

All ``k`` blocks are chosen from these one-shot scores. ``k = round(ratio * n_blocks)`` and at least one when
``ratio > 0``, so ``ratio`` is met to the nearest block; the report gives the fraction actually removed.
The config is kept consistent (``num_hidden_layers``; per-layer lists such as ``layer_types``, lists of layer
indices such as Qwen MoE's ``mlp_only_layers``, leading counts such as DeepSeek's ``first_k_dense_replace``;
every attention's ``layer_idx`` for the KV cache) so ``save_pretrained`` / ``from_pretrained`` round-trip, and
every kept block keeps its own attention type. The removal is rehearsed on a meta copy first: if the pruned
model would differ from what its config describes (a per-layer rule we do not know), nothing is changed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import LAYER_INDEX_LISTS, LEADING_COUNTS, PER_LAYER_LISTS, family
from ..distributed import sum_over_ranks, together
from ..errors import PrunekitError
from ..forward import block_output, hidden_state, hooks
from .base import ModelMethod, register_structured
from .common import (
    arch_name,
    block_config,
    block_list,
    check_batches,
    check_ratio,
    count_params,
    forward,
    hf_config,
    input_ids,
    meta_clone,
    summary,
)
from .gradients import accumulate_gradients, loss_kind
from .reload import ensure_reloadable

log = logging.getLogger(__name__)

SCORES = ("cosine", "ppl", "taylor")


def blocks_to_remove(n_blocks: int, ratio: float) -> int:
    """Nearest whole number of blocks to ``ratio`` of them (half rounds up), at least one if ``ratio > 0``."""
    k = math.floor(ratio * n_blocks + 0.5)
    k = max(k, 1) if ratio > 0 else 0
    if k >= n_blocks:
        raise PrunekitError(f"removing {ratio:.0%} of {n_blocks} blocks would leave none; lower the ratio")
    if not math.isclose(k / n_blocks, ratio, abs_tol=1e-9):
        log.warning(
            "depth removes whole blocks: %g of %d blocks is %.2f blocks, so %d go (%.3g of the blocks)",
            ratio,
            n_blocks,
            ratio * n_blocks,
            k,
            k / n_blocks,
        )
    return k


# ---------------------------------------------------------------- scores


@torch.no_grad()
def cosine_scores(model: nn.Module, blocks: Sequence[nn.Module], batches: Sequence) -> torch.Tensor:
    """``1 - mean cos(input, output)`` of each block's hidden states over all calibration tokens (every rank's)."""
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    counts = torch.zeros(len(blocks), dtype=torch.float64)

    def hook(i):
        def fn(module, args, kwargs, output):
            cos = F.cosine_similarity(hidden_state(args, kwargs).float(), block_output(output).float(), dim=-1)
            sums[i] += cos.double().sum().cpu()
            counts[i] += cos.numel()

        return fn

    with together(), hooks(b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)):
        for batch in batches:
            forward(model, batch)
    sum_over_ranks(sums, counts)
    return (1.0 - sums / counts.clamp_min(1)).float()


@torch.no_grad()
def check_shape_kept(model: nn.Module, prefix: str, blocks: Sequence[nn.Module], batch) -> None:
    """A removed block hands its input on: only blocks whose output is shaped like their input can go (not the
    stages of a ConvNeXt or Swin, each of which changes the width)."""
    changed: list[str] = []

    def hook(i):
        def fn(module, args, kwargs, output):
            before, after = hidden_state(args, kwargs).shape, block_output(output).shape
            if before != after:
                changed.append(f"{prefix}.{i} turns {list(before)} into {list(after)}")

        return fn

    with hooks(b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)):
        forward(model, batch)
    if changed:
        raise PrunekitError(
            f"{arch_name(model)}: depth removes blocks that pass their input on unchanged in shape, but {changed[0]} "
            "(stages of growing width); prune it with an unstructured method"
        )


@torch.no_grad()
def causal_nll(model: nn.Module, batches: Sequence) -> float:
    """Mean next-token negative log-likelihood over the calibration batches (every rank's)."""
    sums = torch.zeros(2, dtype=torch.float64)  # total NLL, tokens
    with together():
        for batch in batches:
            ids = input_ids(batch)
            logits = forward(model, batch).logits[:, :-1].float()
            targets = ids[:, 1:].to(logits.device)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            sums += torch.tensor([nll.item(), targets.numel()], dtype=torch.float64)
    sum_over_ranks(sums)
    return float(sums[0] / sums[1].clamp_min(1))


@contextmanager
def skipping(blocks: Sequence[nn.Module], drop: Sequence[int]):
    """Run the model as if blocks ``drop`` were removed: each returns its input hidden state unchanged, while
    every other block still gets what it got before (its own mask and rotary table), as after ``remove_blocks``.
    (Cutting the list instead would hand later blocks the attention types of earlier positions: Gemma 3.)"""

    def identity(module, args, kwargs, output):
        hidden = hidden_state(args, kwargs)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    with hooks(blocks[i].register_forward_hook(identity, with_kwargs=True) for i in drop):
        yield


@torch.no_grad()
def ppl_scores(model: nn.Module, blocks: Sequence[nn.Module], batches: Sequence) -> torch.Tensor:
    """Increase of the calibration NLL when each block alone is skipped."""
    dense = causal_nll(model, batches)
    scores = []
    for i in range(len(blocks)):
        with skipping(blocks, [i]):
            scores.append(causal_nll(model, batches) - dense)
    return torch.tensor(scores)


def block_weights(blocks: Sequence[nn.Module]) -> dict[str, nn.Parameter]:
    """``"i.name"`` -> every parameter of block ``i`` named ``weight`` (matrices, norm scales; no biases), each
    shared tensor once."""
    seen: set[int] = set()
    found = {}
    for i, block in enumerate(blocks):
        for name, p in block.named_parameters():
            if "weight" in name and p.is_floating_point() and id(p) not in seen:
                seen.add(id(p))
                found[f"{i}.{name}"] = p
    return found


def taylor_scores(
    model: nn.Module, blocks: Sequence[nn.Module], batches: Sequence, checkpointing: bool = True
) -> tuple[torch.Tensor, int]:
    """``sum |w * g|`` over each block's weights (Shortened LLaMA's Taylor criterion); also the bytes the gradient
    sums held."""
    weights = block_weights(blocks)
    grads = accumulate_gradients(model, weights, batches, blocks=list(blocks) if checkpointing else ())
    scores = torch.zeros(len(blocks), dtype=torch.float64)
    for key, p in weights.items():
        salience = (p.detach().float() * grads.grad[key]).abs().sum()
        scores[int(key.split(".", 1)[0])] += salience.double().cpu()
    return scores.float(), grads.nbytes()


# ---------------------------------------------------------------- removal


def _container(model: nn.Module, prefix: str) -> tuple[nn.Module, str, nn.Module]:
    parent_name, _, attr = prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attr, getattr(parent, attr)


def _rebuilt(container: nn.Module, blocks: list[nn.Module]) -> nn.Module:
    return nn.Sequential(*blocks) if isinstance(container, nn.Sequential) else nn.ModuleList(blocks)


def _renumber(blocks: Sequence[nn.Module]) -> None:
    """Every module that knows its layer index (HF attention: ``layer_idx``, the KV-cache slot) gets the new one."""
    for i, block in enumerate(blocks):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = i


def _unroll_sparse_step(config, n_before: int) -> None:
    """Qwen MoE: layer ``i`` is sparse when ``(i + 1) % decoder_sparse_step == 0`` and ``i`` is not in
    ``mlp_only_layers``. Positions shift when blocks go, so the rule becomes an explicit list with step 1."""
    step, dense = getattr(config, "decoder_sparse_step", None), getattr(config, "mlp_only_layers", None)
    if isinstance(step, int) and step > 1 and isinstance(dense, list):
        config.mlp_only_layers = sorted(set(dense) | {i for i in range(n_before) if (i + 1) % step})
        config.decoder_sparse_step = 1


def renumber_config(config, keep: Sequence[int], n_before: int) -> None:
    """Rewrite every per-layer entry of ``config`` for the kept layers ``keep`` (old indices, in order)."""
    new_index = {old: new for new, old in enumerate(keep)}
    _unroll_sparse_step(config, n_before)
    for key in PER_LAYER_LISTS:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == n_before:
            _rewrite(config, key, type(values)(values[i] for i in keep))
    for key in LAYER_INDEX_LISTS:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)):
            setattr(config, key, type(values)(new_index[i] for i in values if i in new_index))
    for key in LEADING_COUNTS:
        count = getattr(config, key, None)
        if isinstance(count, int) and not isinstance(count, bool):
            setattr(config, key, sum(i < count for i in keep))
    config.num_hidden_layers = len(keep)


def _rewrite(config, key: str, value) -> None:
    """Set a per-layer entry; one the config computes from other entries (Jamba's ``layer_types``, from layer
    periods and offsets) cannot follow the kept blocks: refused."""
    try:
        setattr(config, key, value)
    except AttributeError:
        raise PrunekitError(
            f"{getattr(config, 'model_type', type(config).__name__)}: depth cannot describe the kept blocks in the "
            f"config: its {key} is computed from other entries (layer periods and offsets), not a list depth can edit"
        ) from None


def _update_config(model: nn.Module, prefix: str, keep: Sequence[int], n_before: int) -> None:
    config = block_config(model, prefix)
    if config is None:
        return
    renumber_config(config, keep, n_before)
    saved = family(arch_name(model)).saved_counts
    stack = prefix.split(".")[0]
    if stack in saved:
        setattr(hf_config(model), saved[stack], len(keep))


def remove_blocks(model: nn.Module, prefix: str, drop: Sequence[int]) -> nn.Module:
    """Delete blocks ``drop`` from the block list at ``prefix``, keeping the config and layer indices consistent.
    Returns the new block list."""
    parent, attr, container = _container(model, prefix)
    keep = [i for i in range(len(container)) if i not in set(drop)]
    kept = _rebuilt(container, [container[i] for i in keep])
    setattr(parent, attr, kept)
    _renumber(kept)
    _update_config(model, prefix, keep, len(container))
    return kept


def rehearse(model: nn.Module, prefix: str, drop: Sequence[int]) -> None:
    """Remove ``drop`` from a meta copy of the model and check the result is what its config describes, so a
    layout we cannot keep consistent is refused before the real model is touched."""
    clone = meta_clone(model)
    remove_blocks(clone, prefix, drop)
    ensure_reloadable(clone, "depth")


def pinned_blocks(model: nn.Module) -> tuple[int, ...]:
    return family(arch_name(model)).pinned_blocks


def choose_drop(scores: torch.Tensor, k: int, pinned: Sequence[int] = (), why: str = "") -> list[int]:
    """The ``k`` lowest-scoring blocks (ties: the earlier), never a pinned one; sorted."""
    ranked = [i for i in torch.argsort(scores, stable=True).tolist() if i not in pinned]
    if k > len(ranked):
        raise PrunekitError(
            f"only {len(ranked)} of {len(scores)} blocks can be removed (blocks {sorted(pinned)} stay: "
            f"{why or 'they hold weights the others reuse'}); lower the ratio"
        )
    return sorted(ranked[:k])


@register_structured
@dataclass
class Depth(ModelMethod):
    """Remove whole blocks, the least important first (``score``: ``cosine``, ``ppl`` or ``taylor``)."""

    name: ClassVar[str] = "depth"
    score: str = "cosine"
    keep_first: int = 0
    keep_last: int = 0
    checkpointing: bool | None = None  # score="taylor": recompute each block in the backward pass (default on)

    def __post_init__(self):
        if self.score not in SCORES:
            raise PrunekitError(f"unknown depth score {self.score!r}; choose from {', '.join(SCORES)}")
        if self.keep_first < 0 or self.keep_last < 0:
            raise PrunekitError(f"keep_first / keep_last count blocks and cannot be negative, got {self}")
        if self.checkpointing is not None and self.score != "taylor":
            raise PrunekitError("depth checkpointing applies to score=taylor only; drop it or set score=taylor")

    def block_scores(self, model: nn.Module, blocks: nn.Module, batches: Sequence) -> tuple[torch.Tensor, dict]:
        if self.score == "cosine":
            return cosine_scores(model, list(blocks), batches), {}
        if self.score == "ppl":
            return ppl_scores(model, list(blocks), batches), {}
        scores, nbytes = taylor_scores(model, list(blocks), batches, self.checkpointing is not False)
        held = "one block's activations (checkpointing)" if self.checkpointing is not False else "one window's"
        memory = f"float32 gradient sums of the block weights ({nbytes:,} bytes) + {held}"
        return scores, {"gradient_sum_bytes": nbytes, "gradient_memory": memory}

    def pinned(self, model: nn.Module, n_blocks: int) -> tuple[set[int], str]:
        """Blocks that stay whatever their score (keep_first / keep_last, the family's shared-weight blocks), and
        why, for the error when too few remain."""
        kept = set(range(min(self.keep_first, n_blocks))) | set(range(max(n_blocks - self.keep_last, 0), n_blocks))
        shared = set(pinned_blocks(model))
        reasons = [r for r, found in (("keep_first / keep_last", kept), ("shared weights", shared)) if found]
        return kept | shared, " and ".join(reasons)

    def prune_model(self, model: nn.Module, batches: list, ratio: float) -> dict:
        ratio = check_ratio(ratio)
        check_batches(batches, self.name)
        prefix, blocks = block_list(model)
        if self.score == "taylor":
            loss_kind(model, batches[0])
        k, (pinned, why) = blocks_to_remove(len(blocks), ratio), self.pinned(model, len(blocks))
        last_k = choose_drop(torch.arange(len(blocks), 0, -1), k, pinned, why)
        rehearse(model, prefix, last_k)  # the last k removable blocks, before any work
        check_shape_kept(model, prefix, blocks, batches[0])
        before, total_before = count_params(blocks), count_params(model)
        scores, memory = self.block_scores(model, blocks, batches)
        drop = choose_drop(scores, k, pinned, why)
        rehearse(model, prefix, drop)
        kept = remove_blocks(model, prefix, drop)
        log.info("depth (%s): removed blocks %s of %d", self.score, drop, len(blocks))
        return summary(
            before,
            count_params(kept),
            total_before,
            count_params(model),
            score=self.score,
            blocks_before=len(blocks),
            removed_blocks=drop,
            block_scores=[round(float(s), 6) for s in scores],
            **memory,
        )
