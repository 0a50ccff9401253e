"""Token windows as each kind of text model's inputs."""

from __future__ import annotations

import pytest
import torch

from prunekit.data.inputs import encoder_inputs, padded, seq2seq_inputs, shift_right
from prunekit.errors import PrunekitError


def test_encoder_inputs_are_full_windows_in_batches():
    batches = encoder_inputs(torch.arange(12).view(3, 4), batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    assert all(bool(b["attention_mask"].all()) for b in batches)


def test_seq2seq_splits_each_window_and_teacher_forces_the_decoder():
    (batch,) = seq2seq_inputs(torch.tensor([[10, 11, 12, 13, 14]]), batch_size=4, start=0, labels=True)
    assert batch["input_ids"].tolist() == [[10, 11]]  # the first half (rounded down) to the encoder
    assert batch["labels"].tolist() == [[12, 13, 14]]  # the rest is the decoder's target
    assert batch["decoder_input_ids"].tolist() == [[0, 12, 13]]  # fed shifted right behind the start token
    assert shift_right(torch.tensor([[5, 6]]), 9).tolist() == [[9, 5]]
    with pytest.raises(PrunekitError, match="at least 2 tokens"):
        seq2seq_inputs(torch.tensor([[1]]), 1, 0)


def test_padding_is_on_the_right_and_masked():
    batch = padded([[1, 2, 3], [4]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
