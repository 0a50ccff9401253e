"""The distillation terms against direct computations, and the block mapping after depth pruning."""

from __future__ import annotations

import math

import pytest
import torch

from prunekit.distill import hidden_state_loss, kd_loss, teacher_blocks
from prunekit.distill.losses import block_pairs
from prunekit.errors import PrunekitError


def test_kl_term_equals_the_hand_computed_value():
    """p_t = (3/4, 1/4), p_s = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2)."""
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    student = torch.zeros(1, 2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_kl_term_equals_the_definition_over_positions_and_leaves_padding_out():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    p_t, p_s = teacher.softmax(-1), student.softmax(-1)
    per_position = (p_t * (p_t.log() - p_s.log())).sum(-1)
    assert kd_loss(student, teacher).item() == pytest.approx(per_position.mean().item(), rel=1e-5)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    expected = per_position[mask.bool()].mean().item()
    assert kd_loss(student, teacher, mask=mask).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_temperature_softens_both_sides_and_t_squared_keeps_the_gradient_scale():
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(4, 10, generator=gen), torch.randn(4, 10, generator=gen)
    t = 3.0
    p_t, p_s = (teacher / t).softmax(-1), (student / t).softmax(-1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    assert kd_loss(student, teacher, t).item() == pytest.approx(t**2 * kl.item(), rel=1e-5)
    assert kd_loss(t * student, t * teacher, t).item() == pytest.approx(t**2 * kd_loss(student, teacher).item())
    # d/ds of T^2 KL(softmax(t/T) || softmax(s/T)) = T (p_s - p_t): the T^2 undoes the 1/T^2 of the softening
    student.requires_grad_(True)
    kd_loss(student, teacher, t).backward()
    assert torch.allclose(student.grad, t * (p_s - p_t) / 4, atol=1e-6)


def test_kl_of_mismatched_vocabularies_is_one_line():
    with pytest.raises(PrunekitError, match="teacher with the student's vocabulary"):
        kd_loss(torch.zeros(1, 3, 5), torch.zeros(1, 3, 6))


def test_hidden_state_terms():
    gen = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)
    expected = ((s - t) ** 2).mean() / (t**2).mean()
    assert hidden_state_loss(s, t, "mse").item() == pytest.approx(expected.item(), rel=1e-5)
    assert hidden_state_loss(10 * s, 10 * t, "mse").item() == pytest.approx(expected.item(), rel=1e-5)  # per block
    assert hidden_state_loss(s, 3 * s, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_state_loss(s, -s, "cosine").item() == pytest.approx(2.0, abs=1e-6)
    with pytest.raises(PrunekitError, match="hidden size"):
        hidden_state_loss(s, t[..., :4])


def test_student_blocks_map_to_the_teacher_blocks_they_came_from():
    """After depth removed block 1 of 4, student blocks 0, 1, 2 are teacher blocks 0, 2, 3."""
    structure = {"blocks_before": 4, "removed_blocks": [1]}
    assert teacher_blocks(structure) == [0, 2, 3]
    assert teacher_blocks({"blocks_before": 4, "removed_blocks": []}) is None and teacher_blocks(None) is None
    assert block_pairs(3, 4, (), [0, 2, 3]) == {0: 0, 1: 2, 2: 3}
    assert block_pairs(3, 4, (2,), [0, 2, 3]) == {2: 3}
    assert block_pairs(4, 4, (), None) == {0: 0, 1: 1, 2: 2, 3: 3}
    with pytest.raises(PrunekitError, match="block_map=teacher_blocks"):
        block_pairs(3, 4, (), None)
    with pytest.raises(PrunekitError, match="hidden_layers \\[3\\] are not blocks"):
        block_pairs(3, 4, (3,), [0, 2, 3])
    with pytest.raises(PrunekitError, match="must give a teacher block"):
        block_pairs(3, 4, (), [0, 2, 4])
