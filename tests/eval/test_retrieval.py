"""Zero-shot accuracy and retrieval recall of dual encoders, on cases checked by hand."""

from __future__ import annotations

import pytest
import torch

from prunekit.eval.retrieval import recall_at, retrieval_recall, zeroshot_accuracy


def test_recall_counts_a_query_right_when_any_right_answer_is_in_its_top_k():
    similarity = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
    right = torch.tensor([[False, False, True], [False, True, False]])
    assert recall_at(similarity, right, 1) == 0.0  # query 0 ranks answer 0 first, query 1 answer 2
    assert recall_at(similarity, right, 2) == 1.0
    assert recall_at(similarity, right, 5) == 1.0  # k beyond the answers: every one


class Towers(torch.nn.Module):
    """A stand-in dual encoder: an image's embedding is its pixels' mean per channel, a text's its first ids."""

    def forward(self, input_ids, pixel_values, attention_mask=None):
        from types import SimpleNamespace

        return SimpleNamespace(
            image_embeds=pixel_values.mean(dim=(2, 3)), text_embeds=input_ids[:, :3].float(), logits_per_image=None
        )


def image(r: float, g: float, b: float) -> torch.Tensor:
    return torch.tensor([r, g, b], dtype=torch.float32).view(3, 1, 1).expand(3, 2, 2)


def test_zeroshot_picks_the_closest_prompt():
    prompts = {"input_ids": torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]])}
    images = [torch.stack([image(1, 0, 0), image(0, 0.2, 1)]), torch.stack([image(1, 1, 0)])]
    result = zeroshot_accuracy(Towers(), images, prompts, torch.tensor([0, 2, 2]))
    assert result["zeroshot_top1"] == pytest.approx(2 / 3)  # the third image's closest prompt is 3, not 2
    assert result["zeroshot_top5"] == 1.0


def test_repeated_captions_are_one_text_right_for_each_of_its_images():
    """Two images share the caption 'red': text-to-image is right when either comes first."""
    pairs = [("a.png", "red"), ("b.png", "red"), ("c.png", "blue")]
    batch = {
        "input_ids": torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 1]]),
        "pixel_values": torch.stack([image(1, 0, 0), image(0.9, 0.1, 0), image(0, 0, 1)]),
    }
    result = retrieval_recall(Towers(), [batch], pairs)
    assert result["i2t_recall@1"] == 1.0 and result["t2i_recall@1"] == 1.0
    batch["pixel_values"] = torch.stack([image(1, 0, 0), image(0, 0, 1), image(0, 0.1, 1)])  # b looks blue
    result = retrieval_recall(Towers(), [batch], pairs)
    # b retrieves blue (wrong); blue retrieves b before c (wrong), red still a
    assert result["i2t_recall@1"] == pytest.approx(2 / 3) and result["t2i_recall@1"] == pytest.approx(1 / 2)
    assert result["i2t_recall@5"] == result["t2i_recall@5"] == 1.0
