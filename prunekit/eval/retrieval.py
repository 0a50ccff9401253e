"""Dual encoders (CLIP, SigLIP): zero-shot classification and image-text retrieval, from the embeddings the model
itself returns (``image_embeds``, ``text_embeds``), compared by cosine similarity (the logit scale and SigLIP's
bias change no ranking).

* Zero-shot: each class name put into a prompt (``"a photo of a {}."``); an image is classified as the prompt
  closest to it; top-1 (and top-5 with at least 5 classes) over an ImageFolder (``zeroshot_top1``).
* Retrieval: every image against every distinct caption of an image-text set and back; recall@k is the share of
  queries with a right answer among the k closest (a caption is right for an image it describes; an image is right
  for a caption written for it, so repeated captions are one query with several right images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.inputs import Inputs
from ..forward import eval_mode, model_device, on_device, run_model

RECALL_AT = (1, 5)


@torch.no_grad()
def pair_embeddings(
    model: nn.Module, batches: list[Inputs], device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised image and text embeddings of every batch (``[n, dim]`` each, float32, on the CPU)."""
    device = torch.device(device) if device is not None else model_device(model)
    images, texts = [], []
    with on_device(model, device), eval_mode(model):
        for batch in tqdm(batches, desc="embedding", leave=False):
            out = run_model(model, batch, device)
            images.append(F.normalize(out.image_embeds.float(), dim=-1).cpu())
            texts.append(F.normalize(out.text_embeds.float(), dim=-1).cpu())
    return torch.cat(images), torch.cat(texts)


def zeroshot_accuracy(
    model: nn.Module,
    images: list[torch.Tensor],
    prompts: Inputs,
    labels: torch.Tensor,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Top-1 (and top-5 with at least 5 classes) of classifying each image as its closest prompt."""
    image_embeds, text_embeds = pair_embeddings(model, [{**prompts, "pixel_values": b} for b in images], device)
    classes = prompts["input_ids"].shape[0]
    ranked = (image_embeds @ text_embeds[:classes].T).argsort(dim=-1, descending=True, stable=True)
    result = {"zeroshot_top1": share(ranked[:, 0] == labels)}
    if classes >= 5:
        result["zeroshot_top5"] = share((ranked[:, :5] == labels[:, None]).any(-1))
    return result


def share(hits: torch.Tensor) -> float:
    """The fraction of true entries, exactly (a count over a count, not a float32 mean)."""
    return int(hits.sum()) / hits.numel()


def recall_at(similarity: torch.Tensor, right: torch.Tensor, k: int) -> float:
    """Share of query rows with a right answer (``right[q, a]``) among their ``k`` most similar answers."""
    top = similarity.topk(min(k, similarity.shape[1]), dim=-1).indices
    return share(right.gather(1, top).any(-1))


def retrieval_recall(
    model: nn.Module, batches: list[Inputs], pairs: list[tuple[str, str]], device: str | torch.device | None = None
) -> dict[str, float]:
    """Image-to-text and text-to-image recall@1 and @5 over the pairs of ``batches`` (``pairs``: the image path and
    caption of each, in order; a repeated image or caption is one item, right for every pair it is in)."""
    image_embeds, text_embeds = pair_embeddings(model, batches, device)
    images, texts = first_rows([p[0] for p in pairs]), first_rows([p[1] for p in pairs])
    image_index, text_index = {k: i for i, k in enumerate(images)}, {k: i for i, k in enumerate(texts)}
    right = torch.zeros(len(images), len(texts), dtype=torch.bool)
    for image, text in pairs:
        right[image_index[image], text_index[text]] = True
    similarity = image_embeds[list(images.values())] @ text_embeds[list(texts.values())].T
    result = {}
    for k in RECALL_AT:
        result[f"i2t_recall@{k}"] = recall_at(similarity, right, k)
        result[f"t2i_recall@{k}"] = recall_at(similarity.T, right.T, k)
    return result


def first_rows(items: list[str]) -> dict[str, int]:
    """Each distinct item and the row where it first appears, in order of first appearance."""
    rows: dict[str, int] = {}
    for row, item in enumerate(items):
        rows.setdefault(item, row)
    return rows
