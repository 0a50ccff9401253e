"""Causal-LM fine-tuning module and text windows."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.finetune import CausalLMModule, TextDataModule
from prunekit.finetune.causal_lm import WindowStream, lr_factor
from prunekit.lightning import PruningCallback
from tests.conftest import tiny_llama


class CharTokenizer:
    """Byte-level ids below 128: enough to tokenise a text file for the tiny Llama."""

    def __call__(self, text: str, return_attention_mask: bool = False) -> dict:
        return {"input_ids": [ord(c) % 128 for c in text]}


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("in the beginning was the word. " * 40)
    return path


def test_text_windows_are_non_overlapping_batches(text_file):
    data = TextDataModule(CharTokenizer(), text_file, val=text_file, seqlen=32, batch_size=4)
    data.setup("fit")
    assert len(data.train_set) == (31 * 40) // 32
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == torch.long
    first = torch.cat([data.train_set[i]["input_ids"] for i in range(2)])
    assert first.tolist() == CharTokenizer()(text_file.read_text())["input_ids"][:64]


def test_a_later_stage_continues_the_window_stream():
    """``offset`` windows into the seeded order, across epoch ends: full then LoRA sees new text in its LoRA stage."""
    first = WindowStream(10, seed=3)
    epochs = [list(first) for _ in range(3)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs) and epochs[0] != epochs[1]
    stream = [i for epoch in epochs for i in epoch]
    later = WindowStream(10, seed=3, offset=7)
    assert [i for _ in range(2) for i in later] == stream[7:27]


def test_too_little_training_text_is_one_line(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("in the beginning " * 5)  # 85 characters: 2 windows of 32
    with pytest.raises(PrunekitError, match="makes 2 windows of 32 tokens, fewer than one batch of 4"):
        TextDataModule(CharTokenizer(), path, seqlen=32, batch_size=4).setup("fit")


def test_lr_warmup_then_cosine():
    assert lr_factor(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, 0.1) == 1.0
    assert lr_factor(60, 10, 110, 0.1) == pytest.approx(0.55)
    assert lr_factor(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 0, None, 0.1) == 1.0


def test_finetuning_lowers_the_loss_and_keeps_gradual_masks(text_file):
    model = tiny_llama()
    data = TextDataModule(CharTokenizer(), text_file, seqlen=32, batch_size=4)
    module = CausalLMModule(model.train(), lr=3e-3)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        before = module._loss(batch).item()
    pruning = PruningCallback("wanda", 0.5, schedule="cubic", end_step=6, every_n_steps=3, calib_batches=2)
    L.Trainer(
        max_steps=12,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[pruning],
    ).fit(module, datamodule=data)
    with torch.no_grad():
        after = module._loss(batch).item()
    assert after < before and pruning.sparsity() == 0.5
