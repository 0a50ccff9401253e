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


def test_collate_pads_every_per_token_tensor_and_concatenates_packed_patches():
    """Mllama's cross-attention mask is per token ([1, tokens, images, tiles]): it was concatenated unpadded ("Sizes
    of tensors must match"). Qwen2-VL's patches of every image are one [patches, features] tensor: concatenated."""
    samples = []
    for ids in ([9, 9, 5, 6], [9, 9, 7]):
        s = sample(ids)
        s["cross_attention_mask"] = torch.ones(1, len(ids), 1, 1, dtype=torch.long)
        s["pixel_values"] = torch.randn(16, 384)
        s["image_grid_thw"] = torch.tensor([[1, 4, 4]])
        samples.append(s)
    batch = collate(samples, pad_id=3)
    assert batch["input_ids"].tolist() == [[9, 9, 5, 6], [9, 9, 7, 3]]
    assert batch["cross_attention_mask"][:, :, 0, 0].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["pixel_values"].shape == (32, 384) and batch["image_grid_thw"].shape == (2, 3)


def test_dual_encoder_pairs_from_an_image_folder_or_captions(tmp_path):
    """A dual encoder calibrates on captioned images: an ImageFolder's class names fill the prompt, or the bundled
    digits captions (image paths relative to the .jsonl file)."""
    from prunekit.cli import demo_assets
    from prunekit.data.image_text import caption_records, folder_records, is_image_folder, pair_inputs
    from tests import zoo

    digits = demo_assets() / "digits"
    records, classes = folder_records(str(digits / "val"), "a photo of a {}.")
    assert classes == [str(i) for i in range(10)] and records[0]["text"] == "a photo of a 0."
    assert is_image_folder(str(digits / "val")) and not is_image_folder(str(digits / "val-captions.jsonl"))
    captioned = caption_records(str(digits / "val-captions.jsonl"), "--eval-data", "{}")
    assert len(captioned) == 100 and all(r["image"].is_file() for r in captioned)
    batches = pair_inputs(zoo.processor("clip"), captioned[:5], batch_size=2, max_length=zoo.TEXT_POSITIONS)
    assert [b["input_ids"].shape for b in batches] == [(2, zoo.TEXT_POSITIONS)] * 2 + [(1, zoo.TEXT_POSITIONS)]
    assert batches[0]["pixel_values"].shape == (2, 3, zoo.IMAGE_SIZE, zoo.IMAGE_SIZE)
