"""``DistillationCallback`` in a Lightning fit: the teacher stays frozen and outside the student, the KD loss
falls, hidden states are matched to the teacher blocks the student's blocks came from, misuse is one line."""

from __future__ import annotations

import copy

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import prunekit
from prunekit.distill import DistillationCallback, Teacher, kd_loss, teacher_blocks
from prunekit.errors import PrunekitError
from prunekit.finetune import CausalLMModule
from prunekit.lightning import PruningCallback
from tests.conftest import tiny_llama


def trainer(steps: int, callbacks: list) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def token_loader(batches: int = 4, seed: int = 0) -> DataLoader:
    ids = torch.randint(0, 128, (4 * batches, 16), generator=torch.Generator().manual_seed(seed))
    return DataLoader([{"input_ids": row} for row in ids], batch_size=4)


def test_teacher_is_a_frozen_copy_of_the_dense_model_outside_the_student():
    """Without a teacher the callback copies the model as fit starts, before PruningCallback prunes it."""
    model = tiny_llama()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    module = CausalLMModule(model.train(), lr=1e-2)
    keys = list(module.state_dict())
    distil = DistillationCallback(kd_weight=1.0)
    trainer(3, [PruningCallback("magnitude", 0.5), distil]).fit(module, train_dataloaders=token_loader())
    teacher = distil.teacher.model
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, dense[k]) for k, v in teacher.state_dict().items())  # unchanged, unpruned
    assert float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == 0.5  # the student was pruned
    assert list(module.state_dict()) == keys  # the teacher is not part of the module
    assert [row["step"] for row in distil.history] == [0, 1, 2] and distil.history[0]["kd"] > 0  # dense vs pruned


def test_distillation_lowers_the_kd_loss():
    teacher = tiny_llama(seed=0)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10)  # a confident teacher: a KL far from zero
    student = tiny_llama(seed=1)
    batch = next(iter(token_loader()))["input_ids"]

    def kd() -> float:
        with torch.no_grad():
            return kd_loss(student(batch).logits, teacher(batch).logits).item()

    before = kd()
    distil = DistillationCallback(teacher=teacher, kd_weight=1.0, task_loss_weight=0.0)
    same_batch = DataLoader([{"input_ids": row} for row in batch.repeat(12, 1)], batch_size=4)
    trainer(12, [distil]).fit(CausalLMModule(student.train(), lr=1e-2), train_dataloaders=same_batch)
    assert kd() < 0.5 * before
    assert all(row["loss"] == row["kd"] for row in distil.history)  # task weight 0: the loss is the KD term


def test_hidden_states_are_matched_to_the_teacher_blocks_the_student_blocks_came_from():
    dense = tiny_llama(layers=4)
    student = copy.deepcopy(dense)
    calib = [{"input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))}]
    report = prunekit.prune(student, "depth", 0.25, calib=calib)
    (removed,) = report.structure["removed_blocks"]
    mapping = teacher_blocks(report.structure)
    assert mapping == [i for i in range(4) if i != removed]
    for i, j in enumerate(mapping):  # the weights of student block i are those of teacher block mapping[i]
        assert torch.equal(student.model.layers[i].mlp.down_proj.weight, dense.model.layers[j].mlp.down_proj.weight)
    ids = {"input_ids": calib[0]["input_ids"]}
    _, taught = Teacher(copy.deepcopy(dense))((), ids, mapping)
    _, own = Teacher(copy.deepcopy(student))((), ids, range(3))
    for i, j in enumerate(mapping):  # blocks before the removed one see the same input: the same output
        assert torch.allclose(own[i], taught[j]) == (i < removed)

    distil = DistillationCallback(teacher=dense, block_map=mapping, hidden_weight=1.0, task_loss_weight=0.0)
    trainer(1, [distil]).fit(CausalLMModule(student.train(), lr=1e-3), train_dataloaders=token_loader())
    assert distil._pairs == dict(enumerate(mapping)) and distil.history[0]["hidden"] > 0
    with pytest.raises(PrunekitError, match="block_map=teacher_blocks"):
        trainer(1, [DistillationCallback(teacher=dense, hidden_weight=1.0)]).fit(
            CausalLMModule(student.train()), train_dataloaders=token_loader()
        )


class ForgetsDistillation(CausalLMModule):
    def training_step(self, batch, batch_idx):
        return self._loss(batch)


def test_a_training_step_without_the_distillation_terms_fails_before_any_update():
    model = tiny_llama()
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(PrunekitError, match="return prunekit.distill.distillation_loss\\(self, loss\\)"):
        trainer(2, [DistillationCallback(kd_weight=1.0)]).fit(
            ForgetsDistillation(model.train(), lr=1e-2), train_dataloaders=token_loader()
        )
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


def test_a_copy_of_a_model_pruned_before_fit_is_not_a_teacher():
    module = CausalLMModule(tiny_llama().train())
    with pytest.raises(PrunekitError, match="pass teacher= the dense model"):
        trainer(1, [PruningCallback(schedule="fixed"), DistillationCallback(kd_weight=1.0)]).fit(
            module, train_dataloaders=token_loader()
        )


def test_an_image_classifier_distils_logits_and_blocks_with_the_teacher_on_the_cpu():
    import timm

    from prunekit.eval.image import ImageClassifier

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=4)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(images, torch.arange(8) % 4), batch_size=4)
    distil = DistillationCallback(kd_weight=1.0, kd_temperature=2.0, hidden_weight=1.0, teacher_device="cpu")
    trainer(2, [PruningCallback("magnitude", 0.5, group="per-layer"), distil]).fit(
        ImageClassifier(vit, lr=1e-3), train_dataloaders=data
    )
    assert distil._pairs == {0: 0, 1: 1} and distil.teacher.device == torch.device("cpu")
    assert set(distil.history[1]) == {"fit", "step", "task", "kd", "hidden", "loss"}
    assert distil.history[1]["kd"] > 0 and distil.history[1]["hidden"] > 0
