"""Image-text records as model inputs: one batch from single samples, and which tokens are text targets."""

from __future__ import annotations

import torch

from prunekit.data.image_text import collate, text_labels
from prunekit.data.inputs import IGNORE


def sample(ids: list[int]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": torch.zeros(1, 3, 4, 4),
    }


def test_collate_pads_tokens_and_stacks_pixels():
    batch = collate([sample([9, 9, 5, 6]), sample([9, 9, 7])], pad_id=0)
    assert batch["input_ids"].tolist() == [[9, 9, 5, 6], [9, 9, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["pixel_values"].shape == (2, 3, 4, 4)


def test_image_placeholders_and_padding_are_not_targets():
    batch = collate([sample([9, 9, 5, 6]), sample([9, 9, 7])], pad_id=0)
    assert text_labels(batch, image_token_id=9).tolist() == [[IGNORE, IGNORE, 5, 6], [IGNORE, IGNORE, 7, IGNORE]]
