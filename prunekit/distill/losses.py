"""The distillation loss terms as functions of tensors, and the block mapping after depth pruning.

``kd_loss`` is ``T^2 KL(p_t || p_s)`` with ``p = softmax(logits / T)``, averaged over the positions that have a
distribution (every token of a causal LM, every image of a classifier). Hinton et al. (2015) multiply by ``T^2``
because the gradient of the softened KL scales as ``1 / T^2``; with it the term keeps the task loss's scale
whatever the temperature. Everything is computed in float32, whatever the models' dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import PrunekitError


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T^2`` times the mean over positions of ``KL(softmax(t/T) || softmax(s/T))``; logits ``[..., classes]``,
    ``mask`` (``[...]``, 1 = counted) leaves out padding."""
    if student_logits.shape != teacher_logits.shape:
        raise PrunekitError(
            f"the student's logits have shape {tuple(student_logits.shape)} and the teacher's "
            f"{tuple(teacher_logits.shape)}: distil from a teacher with the student's vocabulary (or classes)"
        )
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    return masked_mean(per_position, mask) * temperature**2


def hidden_state_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """One block's term. ``mse``: mean squared difference over the teacher output's mean square, so that blocks
    whose residual stream is large do not outweigh the others; ``cosine``: mean of ``1 - cos`` per token."""
    if student.shape != teacher.shape:
        raise PrunekitError(
            f"a student block outputs shape {tuple(student.shape)} and its teacher block {tuple(teacher.shape)}: "
            "hidden-state distillation needs the teacher's hidden size (SliceGPT changes it); use kd_weight only"
        )
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return masked_mean(1 - F.cosine_similarity(s, t, dim=-1), mask)
    scale = masked_mean(t.pow(2).mean(-1), mask).clamp_min(torch.finfo(torch.float32).tiny)
    return masked_mean((s - t).pow(2).mean(-1), mask) / scale


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1)


def token_mask(kwargs: Mapping[str, Any], shape: torch.Size) -> torch.Tensor | None:
    """The batch's ``attention_mask`` when it has one of the positions' shape (padding is not distilled)."""
    mask = kwargs.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(shape) else None


def teacher_blocks(structure: Mapping[str, Any] | None) -> list[int] | None:
    """For each block of a depth-pruned student, the teacher block it came from (the kept ones, in order), read
    from the prune report's ``structure`` (``removed_blocks``, ``blocks_before``); None when no block was removed
    (student block ``i`` is teacher block ``i``)."""
    if not structure or not structure.get("removed_blocks"):
        return None
    removed = set(structure["removed_blocks"])
    return [i for i in range(structure["blocks_before"]) if i not in removed]


def block_pairs(
    student_blocks: int, teacher_count: int, chosen: Sequence[int], mapping: Sequence[int] | None
) -> dict[int, int]:
    """``{student block: teacher block}`` for the chosen student blocks (all when ``chosen`` is empty); without a
    ``mapping`` student block ``i`` is teacher block ``i``, which needs as many blocks on both sides."""
    if mapping is None:
        if student_blocks != teacher_count:
            raise PrunekitError(
                f"the student has {student_blocks} blocks and the teacher {teacher_count}: say which teacher block "
                "each student block came from with block_map=teacher_blocks(report.structure) (depth pruning)"
            )
        mapping = range(student_blocks)
    mapping = list(mapping)
    if len(mapping) != student_blocks or not all(0 <= j < teacher_count for j in mapping):
        raise PrunekitError(
            f"block_map {mapping} must give a teacher block (0..{teacher_count - 1}) for each of the student's "
            f"{student_blocks} blocks"
        )
    bad = [i for i in chosen if i >= student_blocks]
    if bad:
        raise PrunekitError(f"hidden_layers {bad} are not blocks of the student (it has {student_blocks})")
    return {i: mapping[i] for i in (chosen or range(student_blocks))}
